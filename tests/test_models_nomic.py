"""NomicBERT (nomic-embed-text v1 / v1.5) on the packed code against transformers: the body with
default, linear and dynamic-NTK rotary positions (odd head counts, a head_dim of its own), its
sequence and token classifiers, sequence by sequence and in mixed-length packed batches, with
and without the oneDNN CPU path; a checkpoint in nomic's remote-code layout; a
Sentence-Transformers directory with nomic's search_query / search_document prompts against
SentenceTransformer.encode, offline and over gRPC."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import transformers
from conftest import ServerProcess
from poolsvc_client import decode_tensor
from tiny_models import TOKENIZER_FILES, load_ours, st_pipeline

from poolsvc import LLM
from poolsvc.engine import cpu, native
from poolsvc.engine.errors import ModelLoadError
from poolsvc.engine.models import ARCHITECTURES
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.pooler import sequence_rows
from poolsvc.gen.v1 import (
    classify_pb2,
    classify_pb2_grpc,
    common_pb2,
    embed_pb2,
    embed_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
)

ATOL = 1e-4
CPU = dict(device="cpu", threads=2)
PROMPTS = {"query": "search_query: ", "document": "search_document: "}
TEXTS = ["What is the capital of France?", "x",
         "Paris is the capital and largest city of France, on the Seine.",
         "café naïve 🚀 東京は日本の首都です。 and a longer tail of words after it"]
# 3 heads of 12 (odd head count); max_position_embeddings 16 so the dynamic variant's longer
# sequences take NTK scaling, each by its own length
BASE = dict(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40,
            max_position_embeddings=64)
ROPES = {
    "default": {},
    "dynamic": dict(max_position_embeddings=16,
                    rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0}),
    "linear": dict(head_dim=8, rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                "rope_theta": 1000.0}),
}
LENGTHS = {"default": [7, 1, 64, 23, 40], "dynamic": [7, 1, 16, 17, 32, 23],
           "linear": [7, 1, 64, 23]}


def nomic(directory: Path, minilm_path: Path, task: str = "Model", seed: int = 0,
          **config_kw) -> Path:
    """A tiny random transformers NomicBERT with MiniLM's WordPiece tokenizer (token types
    included, as nomic's BERT tokenizer has them)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path / name, directory / name)
    torch.manual_seed(seed)
    config = transformers.NomicBertConfig(vocab_size=30522, **{**BASE, **config_kw})
    model = getattr(transformers, f"NomicBert{task}")(config).eval()
    with torch.no_grad():  # trained norms are not identity, trained biases not zero
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)
            elif "token_type" in name:
                p.add_(torch.randn_like(p))
            elif "q_proj" in name or "k_proj" in name:  # sharp attention: positions matter
                p.mul_(3.0)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, minilm_path):
    root = tmp_path_factory.mktemp("nomic")
    out = {rope: nomic(root / rope, minilm_path, seed=i, **extra)
           for i, (rope, extra) in enumerate(ROPES.items())}
    out["seq"] = nomic(root / "seq", minilm_path, "ForSequenceClassification", seed=5,
                       num_labels=3, **ROPES["dynamic"])
    out["tok"] = nomic(root / "tok", minilm_path, "ForTokenClassification", seed=6,
                       num_labels=5)
    return out


def ours_class(task: str):
    module, name = ARCHITECTURES[f"NomicBert{task}"]
    return getattr(module, name)


def sequences(lengths: list[int]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(len(lengths))
    return [[101] + torch.randint(999, 30522, (n - 1,), generator=gen).tolist() for n in lengths]


def run_alone(hf, ids: list[int], token_types: list[int]):
    """transformers on one sequence, its dynamic rotary state reset first: transformers keeps
    the frequencies of the longest sequence seen until a shorter-than-trained one comes."""
    for module in hf.modules():
        if isinstance(module, transformers.models.nomic_bert.modeling_nomic_bert
                      .NomicBertRotaryEmbedding):
            module.register_buffer("inv_freq", module.original_inv_freq.clone(),
                                   persistent=False)
            module.max_seq_len_cached = module.original_max_seq_len
    return hf(torch.tensor([ids]), token_type_ids=torch.tensor([token_types]))


def forward_both(ours, hf, ids):
    """Our packed forward over every sequence at once (second halves of token type 1), and
    transformers' on each alone."""
    types = [[0] * (len(s) // 2) + [1] * (len(s) - len(s) // 2) for s in ids]
    batch = PackedBatch.build(ids, types, torch.device("cpu"), ours.position_offset)
    with torch.no_grad():
        hidden = ours(batch)  # [num_tokens, hidden]
        outputs = [run_alone(hf, s, t) for s, t in zip(ids, types)]
    return batch, hidden, outputs


def max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape
    return (got - want).abs().max().item()


@pytest.mark.parametrize("rope,path", [("default", "torch"), ("default", "onednn"),
                                       ("default", "native"), ("dynamic", "torch"),
                                       ("dynamic", "native"), ("linear", "torch")])
def test_body_matches_transformers(checkpoints, rope, path, monkeypatch):
    monkeypatch.setattr(cpu, "SLICE_TOKENS", 40)  # the sliced path: sequences in several parts
    hf = transformers.AutoModel.from_pretrained(checkpoints[rope]).eval()
    ours = load_ours(ours_class("Model"), checkpoints[rope])
    if path != "torch":
        kernels = native.load() if path == "native" else None
        if path == "native" and kernels is None:
            pytest.skip("the native kernels cannot be built here (no C++ compiler)")
        assert cpu.optimize(ours, kernels) > 0
    assert ours.max_positions == max(LENGTHS[rope])
    _, hidden, outputs = forward_both(ours, hf, sequences(LENGTHS[rope]))
    want = torch.cat([o.last_hidden_state[0] for o in outputs])
    assert max_diff(hidden, want) <= ATOL


def test_dynamic_ntk_is_per_sequence(checkpoints):
    """A sequence's states do not depend on the longest sequence packed beside it."""
    ours = load_ours(ours_class("Model"), checkpoints["dynamic"])
    ids = sequences([17, 32])
    with torch.no_grad():
        together = ours(PackedBatch.build(ids, None, torch.device("cpu"), 0))
        alone = ours(PackedBatch.build(ids[:1], None, torch.device("cpu"), 0))
    assert max_diff(together[:17], alone) <= 1e-5


def test_classifiers_match_transformers(checkpoints):
    seq = transformers.AutoModelForSequenceClassification.from_pretrained(
        checkpoints["seq"]).eval()
    ours = load_ours(ours_class("ForSequenceClassification"), checkpoints["seq"])
    assert ours.num_labels == 3
    batch, hidden, outputs = forward_both(ours, seq, sequences(LENGTHS["dynamic"]))
    with torch.no_grad():
        logits = ours.head(sequence_rows(ours.head_pooling, hidden, batch.cu_seqlens, None))
    assert max_diff(logits, torch.stack([o.logits[0] for o in outputs])) <= ATOL

    tagger = transformers.AutoModelForTokenClassification.from_pretrained(
        checkpoints["tok"]).eval()
    ours = load_ours(ours_class("ForTokenClassification"), checkpoints["tok"])
    _, hidden, outputs = forward_both(ours, tagger, sequences(LENGTHS["default"]))
    with torch.no_grad():
        logits = ours.head(hidden)
    assert max_diff(logits, torch.cat([o.logits[0] for o in outputs])) <= ATOL


def test_masked_lm_is_a_body(checkpoints, tmp_path, minilm_path):
    directory = nomic(tmp_path / "mlm", minilm_path, "ForMaskedLM", seed=7)
    hf = transformers.NomicBertForMaskedLM.from_pretrained(directory).eval().nomic_bert
    ours = load_ours(ours_class("ForMaskedLM"), directory)
    _, hidden, outputs = forward_both(ours, hf, sequences(LENGTHS["default"]))
    assert max_diff(hidden, torch.cat([o.last_hidden_state[0] for o in outputs])) <= ATOL


def test_offline_token_classifier(checkpoints):
    """Through the offline API (the CPU path), against transformers on the tokenizer's ids;
    the sequence classifier is served over gRPC below."""
    tok = transformers.AutoTokenizer.from_pretrained(checkpoints["tok"])
    tagger = transformers.AutoModelForTokenClassification.from_pretrained(
        checkpoints["tok"]).eval()
    with torch.no_grad():
        want = [torch.softmax(tagger(**tok(t, return_tensors="pt")).logits[0], -1)
                for t in TEXTS]
    with LLM(str(checkpoints["tok"]), **CPU) as llm:
        assert llm.engine.model("").implementation == "poolsvc"
        got = llm.encode(TEXTS, pooling_task="token_classify")
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.outputs.data.numpy(), w.numpy(), atol=ATOL)


def remote_code_layout(source: Path, directory: Path) -> Path:
    """`source` with the config nomic's remote code writes (its weights already have that
    code's names: transformers saves them so)."""
    directory = shutil.copytree(source, directory)
    cfg = json.loads((source / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["NomicBertModel"], "model_type": "nomic_bert",
        "activation_function": "swiglu", "n_embd": cfg["hidden_size"],
        "n_head": cfg["num_attention_heads"], "n_layer": cfg["num_hidden_layers"],
        "n_inner": cfg["intermediate_size"], "layer_norm_epsilon": cfg["layer_norm_eps"],
        "max_trained_positions": cfg["max_position_embeddings"], "n_positions": 64,
        "rotary_emb_base": cfg["rope_parameters"]["rope_theta"], "rotary_emb_fraction": 1.0,
        "rotary_emb_interleaved": False, "rotary_scaling_factor": 2.0, "qkv_proj_bias": False,
        "mlp_fc1_bias": False, "mlp_fc2_bias": False, "prenorm": False,
        "type_vocab_size": cfg["type_vocab_size"], "vocab_size": cfg["vocab_size"]}))
    return directory


def test_remote_code_layout(checkpoints, tmp_path):
    """The hub's nomic-embed-text config keys, rotary_scaling_factor as dynamic NTK, against
    transformers on the same weights with its own config."""
    hf = transformers.AutoModel.from_pretrained(checkpoints["dynamic"]).eval()
    ours = load_ours(ours_class("Model"), remote_code_layout(checkpoints["dynamic"],
                                                             tmp_path / "remote"))
    assert ours.max_positions == 64  # n_positions
    _, hidden, outputs = forward_both(ours, hf, sequences(LENGTHS["dynamic"]))
    assert max_diff(hidden, torch.cat([o.last_hidden_state[0] for o in outputs])) <= ATOL


def st_directory(body: Path, directory: Path) -> Path:
    """Transformer + mean Pooling + Normalize, with nomic's prompts."""
    st_pipeline(directory, body, "mean")
    (directory / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": PROMPTS, "default_prompt_name": None, "similarity_fn_name": "cosine"}))
    return directory


def test_sentence_transformers_prompts(checkpoints, tmp_path):
    from sentence_transformers import SentenceTransformer
    directory = st_directory(checkpoints["default"], tmp_path / "st")
    st = SentenceTransformer(str(directory), device="cpu")
    with LLM(str(directory), **CPU) as llm:
        assert llm.engine.model("").implementation == "poolsvc"
        for name in (None, *PROMPTS):
            want = st.encode(TEXTS, prompt_name=name, convert_to_numpy=True)
            got = np.array([o.outputs.embedding for o in llm.embed(TEXTS, prompt_name=name)])
            assert np.abs(got - want).max() <= ATOL


@pytest.mark.parametrize("change,message", [
    ({"rotary_emb_fraction": 0.5}, "rotary_emb_fraction=0.5 is not supported"),
    ({"rotary_emb_interleaved": True}, "rotary_emb_interleaved=True is not supported"),
    ({"qkv_proj_bias": True}, "qkv_proj_bias=True is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1000.0}},
     "rope_type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1000.0,
                          "partial_rotary_factor": 0.5}}, "partial_rotary_factor 0.5"),
    ({"activation_function": "relu", "hidden_act": None}, "activation_function 'relu'"),
])
def test_unsupported_configs_are_named(checkpoints, tmp_path, change, message):
    directory = shutil.copytree(checkpoints["tok"], tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelLoadError, match=f"does not describe a usable.*{message}"):
        LLM(str(directory), **CPU)


def test_grpc(checkpoints, tmp_path):
    """The Sentence-Transformers directory and the classifier served on a loopback port."""
    from sentence_transformers import SentenceTransformer
    directory = st_directory(checkpoints["default"], tmp_path / "st")
    srv = ServerProcess(tmp_path / "server.log", "--model", f"nomic={directory}",
                        "--model", f"nomic-clf={checkpoints['seq']}").wait_ready()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            embed = embed_pb2_grpc.EmbedServiceStub(channel)
            st = SentenceTransformer(str(directory), device="cpu")
            for name in ("query", "document"):
                reply = embed.Embed(embed_pb2.EmbedRequest(
                    model="nomic", prompt_name=name,
                    inputs=[common_pb2.Input(text=t) for t in TEXTS]))
                want = st.encode(TEXTS, prompt_name=name, convert_to_numpy=True)
                assert np.abs(decode_tensor(reply.embeddings) - want).max() <= ATOL
            reply = classify_pb2_grpc.ClassifyServiceStub(channel).Classify(
                classify_pb2.ClassifyRequest(model="nomic-clf",
                                             inputs=[common_pb2.Input(text=t) for t in TEXTS]))
            tok = transformers.AutoTokenizer.from_pretrained(checkpoints["seq"])
            seq = transformers.AutoModelForSequenceClassification.from_pretrained(
                checkpoints["seq"]).eval()
            with torch.no_grad():
                encoded = [tok(t) for t in TEXTS]
                want = torch.stack([torch.softmax(run_alone(seq, e["input_ids"],
                                                            e["token_type_ids"]).logits[0], -1)
                                    for e in encoded])
            assert np.abs(decode_tensor(reply.probs) - want.numpy()).max() <= ATOL
            infos = model_pb2_grpc.ModelServiceStub(channel).ListModels(
                model_pb2.ListModelsRequest())
            assert {m.name: m.implementation for m in infos.models} == {
                "nomic": "poolsvc", "nomic-clf": "poolsvc"}
    finally:
        assert srv.terminate() == 0, srv.log()
