"""DeBERTa-v2/v3 on the packed code against transformers: the body (disentangled attention,
log-bucketed relative positions, v2's convolution and token types), its sequence and token
classifiers, sequence by sequence and in mixed-length packed batches, with and without the
oneDNN CPU path; NLI-style classifiers, taggers and sentence-transformers cross-encoders through
the offline API; a classifier and a cross-encoder over gRPC."""

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
from tiny_models import TOKENIZER_FILES, load_ours

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
    model_pb2,
    model_pb2_grpc,
    score_pb2,
    score_pb2_grpc,
)

ATOL = 1e-4
CPU = dict(device="cpu", threads=2)
# v3 (deberta-v3-*, mxbai-rerank-v1, NLI / zero-shot models): buckets of relative positions,
# exact up to 8 here (position_buckets 16) and log-scaled past it, the table shared with the
# key and query projections and layer-normed, no absolute positions, no token types. v2
# (deberta-v2-xlarge style): exact distances clamped at max_relative_positions 24, own
# position projections, absolute positions, token types, a convolution after the first layer,
# embeddings narrower than the hidden size. Odd head counts.
VARIANTS = {
    "v3": dict(hidden_size=45, num_hidden_layers=2, num_attention_heads=3, intermediate_size=64,
               max_position_embeddings=160, relative_attention=True,
               pos_att_type=["p2c", "c2p"], position_buckets=16, share_att_key=True,
               norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0),
    "v2": dict(hidden_size=45, num_hidden_layers=2, num_attention_heads=5, intermediate_size=64,
               max_position_embeddings=160, relative_attention=True, pos_att_type="c2p|p2c",
               max_relative_positions=24, share_att_key=False, position_biased_input=True,
               type_vocab_size=2, conv_kernel_size=3, conv_act="gelu", embedding_size=32,
               hidden_act="gelu_new", pooler_hidden_act="tanh"),
}
LENGTHS = [7, 1, 60, 23, 3, 9]  # past both limits, and sequences of one token
QUERY = "What is the capital of France?"
DOCS = ["Paris is the capital and largest city of France, on the Seine.", "x",
        "A cat is a small feline.", "café naïve 🚀 東京は日本の首都です。 and a tail of words"]
TEXTS = [QUERY, *DOCS]


def deberta(directory: Path, minilm_path: Path, variant: str, task: str = "Model",
            seed: int = 0, **config_kw) -> Path:
    """A tiny random transformers DebertaV2{task} saved with MiniLM's WordPiece tokenizer
    ([CLS] q [SEP] d [SEP] pairs, with token type ids), as DeBERTa's SentencePiece one would
    need sentencepiece."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path / name, directory / name)
    torch.manual_seed(seed)
    config = transformers.DebertaV2Config(vocab_size=30522, **{**VARIANTS[variant], **config_kw})
    model = getattr(transformers, f"DebertaV2{task}")(config).eval()
    with torch.no_grad():  # trained norms are not identity, trained biases not zero
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, minilm_path):
    """variant -> task -> directory, built once for the module."""
    root = tmp_path_factory.mktemp("deberta")
    return {variant: {task: deberta(root / f"{variant}-{task}", minilm_path, variant, task,
                                    seed=seed, **extra)
                      for task, extra in [
                          ("Model", {}),
                          ("ForSequenceClassification", {"num_labels": 3, "id2label": {
                              0: "entailment", 1: "neutral", 2: "contradiction"}}),
                          ("ForTokenClassification", {"num_labels": 5})]}
            for seed, variant in enumerate(VARIANTS)}


@pytest.fixture
def small_blocks(monkeypatch):
    """The CPU path's slices small enough that these batches take the sliced path."""
    monkeypatch.setattr(cpu, "SLICE_TOKENS", 40)
    monkeypatch.setattr(cpu, "ROW_BLOCK", 32)
    monkeypatch.setattr(cpu, "EXACT_ROWS", 8)


def ours_class(task: str):
    module, name = ARCHITECTURES[f"DebertaV2{task}"]
    return getattr(module, name)


def forward_both(ours, hf, variant: str):
    """Our packed forward over sequences of LENGTHS at once (two segments each where the
    variant has token types), and transformers' on each alone."""
    gen = torch.Generator().manual_seed(len(variant))
    ids = [[101] + torch.randint(1000, 30000, (n - 1,), generator=gen).tolist() for n in LENGTHS]
    types = [[0] * (n // 2) + [1] * (n - n // 2) for n in LENGTHS] \
        if hf.config.type_vocab_size > 1 else None
    batch = PackedBatch.build(ids, types, torch.device("cpu"), ours.position_offset)
    with torch.no_grad():
        hidden = ours(batch)  # [num_tokens, hidden]
        outputs = [hf(torch.tensor([s]), token_type_ids=None if types is None
                      else torch.tensor([types[i]])) for i, s in enumerate(ids)]
    return batch, hidden, outputs


def max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape
    return (got - want).abs().max().item()


@pytest.mark.parametrize("optimized", [False, True], ids=["torch", "cpu-path"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_body_matches_transformers(checkpoints, variant, optimized, small_blocks):
    directory = checkpoints[variant]["Model"]
    hf = transformers.AutoModel.from_pretrained(directory).eval()
    ours = load_ours(ours_class("Model"), directory)
    if optimized:
        assert cpu.optimize(ours, native.load()) > 0  # as served: the native kernels
    assert ours.max_positions == 160
    _, hidden, outputs = forward_both(ours, hf, variant)
    want = torch.cat([o.last_hidden_state[0] for o in outputs])
    assert max_diff(hidden, want) <= ATOL


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_heads_match_transformers(checkpoints, variant):
    tasks = checkpoints[variant]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        tasks["ForSequenceClassification"]).eval()
    ours = load_ours(ours_class("ForSequenceClassification"), tasks["ForSequenceClassification"])
    assert ours.num_labels == 3
    batch, hidden, outputs = forward_both(ours, hf, variant)
    with torch.no_grad():
        logits = ours.head(sequence_rows(ours.head_pooling, hidden, batch.cu_seqlens, None))
    assert max_diff(logits, torch.stack([o.logits[0] for o in outputs])) <= ATOL

    hf = transformers.AutoModelForTokenClassification.from_pretrained(
        tasks["ForTokenClassification"]).eval()
    ours = load_ours(ours_class("ForTokenClassification"), tasks["ForTokenClassification"])
    _, hidden, outputs = forward_both(ours, hf, variant)
    with torch.no_grad():
        logits = ours.head(hidden)
    assert max_diff(logits, torch.cat([o.logits[0] for o in outputs])) <= ATOL


def test_offline_classify_embed_and_tag(checkpoints):
    """Through the offline API (the CPU path) against transformers on the tokenizer's ids: an
    NLI-style classifier, a tagger, the body (v3; v2's token types are the cross-encoder's)."""
    tasks = checkpoints["v3"]
    tok = transformers.AutoTokenizer.from_pretrained(tasks["ForSequenceClassification"])
    seq = transformers.AutoModelForSequenceClassification.from_pretrained(
        tasks["ForSequenceClassification"]).eval()
    tagger = transformers.AutoModelForTokenClassification.from_pretrained(
        tasks["ForTokenClassification"]).eval()
    body = transformers.AutoModel.from_pretrained(tasks["Model"]).eval()
    with torch.no_grad():
        encoded = [tok(t, return_tensors="pt") for t in TEXTS]
        want_probs = [torch.softmax(seq(**e).logits[0], -1).numpy() for e in encoded]
        want_tags = [torch.softmax(tagger(**e).logits[0], -1).numpy() for e in encoded]
        want_embed = [torch.nn.functional.normalize(body(**e).last_hidden_state[0, 0], dim=-1)
                      .numpy() for e in encoded]
    with LLM(str(tasks["ForSequenceClassification"]), **CPU) as llm:
        assert llm.engine.model("").implementation == "poolsvc"
        got = [o.outputs.probs for o in llm.classify(TEXTS)]
    np.testing.assert_allclose(np.array(got), np.array(want_probs), atol=ATOL)
    with LLM(str(tasks["ForTokenClassification"]), **CPU) as llm:
        assert llm.engine.model("").implementation == "poolsvc"
        got = llm.encode(TEXTS, pooling_task="token_classify")
    for g, want in zip(got, want_tags):
        np.testing.assert_allclose(g.outputs.data.numpy(), want, atol=ATOL)
    with LLM(str(tasks["Model"]), **CPU) as llm:
        assert llm.engine.model("").implementation == "poolsvc"
        got = [o.outputs.embedding for o in llm.embed(TEXTS)]
    np.testing.assert_allclose(np.array(got), np.array(want_embed), atol=ATOL)


def cross_encoder(directory: Path, minilm_path: Path, variant: str, seed: int) -> Path:
    """A one-label DeBERTa saved by sentence-transformers' CrossEncoder (mxbai-rerank-v1's
    layout)."""
    from sentence_transformers import CrossEncoder
    body = deberta(directory / "hf", minilm_path, variant, "ForSequenceClassification",
                   seed=seed, num_labels=1)
    CrossEncoder(str(body), device="cpu").save_pretrained(str(directory / "st"))
    return directory / "st"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cross_encoder_scores_as_sentence_transformers(tmp_path, minilm_path, variant):
    from sentence_transformers import CrossEncoder
    saved = cross_encoder(tmp_path, minilm_path, variant, seed=5)
    want = CrossEncoder(str(saved), device="cpu").predict([(QUERY, d) for d in DOCS])
    with LLM(str(saved), **CPU) as llm:
        assert llm.engine.model("").implementation == "poolsvc"
        got = np.array([o.outputs.score for o in llm.score(QUERY, DOCS)])
    assert np.abs(got - want).max() <= ATOL


def test_masked_lm_is_a_body(tmp_path, minilm_path):
    directory = deberta(tmp_path / "mlm", minilm_path, "v3", "ForMaskedLM", seed=7)
    hf = transformers.DebertaV2Model.from_pretrained(directory).eval()
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    with torch.no_grad():
        want = [torch.nn.functional.normalize(hf(**tok(t, return_tensors="pt"))
                                              .last_hidden_state[0, 0], dim=-1).numpy()
                for t in TEXTS]
    with LLM(str(directory), **CPU) as llm:
        assert llm.engine.model("").implementation == "poolsvc"
        got = [o.outputs.embedding for o in llm.embed(TEXTS)]
    np.testing.assert_allclose(np.array(got), np.array(want), atol=ATOL)


@pytest.mark.parametrize("change,message", [
    ({"conv_kernel_size": 2}, "conv_kernel_size 2 is not supported"),
    ({"pooler_hidden_size": 30}, "pooler_hidden_size 30 must equal hidden_size 45"),
    ({"pooler_hidden_act": "swiglu"}, "pooler_hidden_act 'swiglu' is not supported"),
    ({"num_attention_heads": 4}, "hidden_size must be a multiple of num_attention_heads"),
])
def test_unsupported_configs_are_named(checkpoints, tmp_path, change, message):
    """The loader refuses them with the reason, not with a shape error or at the first batch."""
    directory = shutil.copytree(checkpoints["v2"]["ForSequenceClassification"], tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelLoadError, match=message):
        LLM(str(directory), **CPU)


def test_over_grpc(checkpoints, tmp_path, minilm_path):
    """An NLI classifier and a cross-encoder on a real loopback server, against transformers
    and sentence-transformers."""
    from sentence_transformers import CrossEncoder
    nli = checkpoints["v3"]["ForSequenceClassification"]
    rerank = cross_encoder(tmp_path / "rerank", minilm_path, "v3", seed=9)
    srv = ServerProcess(tmp_path / "server.log", "--model", f"nli={nli}",
                        "--model", f"rerank={rerank}").wait_ready()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            infos = model_pb2_grpc.ModelServiceStub(channel).ListModels(
                model_pb2.ListModelsRequest(), timeout=60)
            classified = classify_pb2_grpc.ClassifyServiceStub(channel).Classify(
                classify_pb2.ClassifyRequest(model="nli", inputs=[
                    common_pb2.Input(text=t) for t in TEXTS]), timeout=60)
            scored = score_pb2_grpc.ScoreServiceStub(channel).Score(score_pb2.ScoreRequest(
                model="rerank", queries=[common_pb2.Input(text=QUERY)],
                documents=[common_pb2.Input(text=d) for d in DOCS]), timeout=60)
    finally:
        assert srv.terminate() == 0, srv.log()
    assert {m.name: m.implementation for m in infos.models} == {"nli": "poolsvc",
                                                                 "rerank": "poolsvc"}
    tok = transformers.AutoTokenizer.from_pretrained(nli)
    seq = transformers.AutoModelForSequenceClassification.from_pretrained(nli).eval()
    with torch.no_grad():
        want = torch.stack([torch.softmax(seq(**tok(t, return_tensors="pt")).logits[0], -1)
                            for t in TEXTS]).numpy()
    assert np.abs(decode_tensor(classified.probs) - want).max() <= ATOL
    want = CrossEncoder(str(rerank), device="cpu").predict([(QUERY, d) for d in DOCS])
    assert np.abs(decode_tensor(scored.scores) - want).max() <= ATOL
