"""Gemma, Gemma2 and Gemma3 text on the packed code against transformers: bodies, sequence and
token classifiers, sequence by sequence and in mixed-length packed batches longer than their
sliding windows; EmbeddingGemma (bidirectional Gemma3) saved by Sentence-Transformers against
SentenceTransformer.encode; bge-reranker-v2-gemma's LLM reranking against FlagEmbedding's recipe on
transformers' causal LM; offline and over gRPC."""

from __future__ import annotations

import functools
import json
import shutil

import grpc
import numpy as np
import pytest
import torch
import transformers
from conftest import ServerProcess
from poolsvc_client import decode_tensor
from tiny_models import load_ours

from poolsvc import LLM, PoolingParams
from poolsvc.engine import cpu, native
from poolsvc.engine.errors import ModelLoadError
from poolsvc.engine.models import ARCHITECTURES
from poolsvc.engine.models.gemma import GLOBAL, LOCAL
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.pooler import sequence_rows
from poolsvc.engine.reranker import BGE_GEMMA
from poolsvc.gen.v1 import common_pb2, embed_pb2, embed_pb2_grpc, score_pb2, score_pb2_grpc

ATOL = 1e-4
CPU = dict(device="cpu", threads=2)
# Every sliding window (4 tokens) is shorter than most of these.
LENGTHS = [12, 1, 7, 30, 5, 13]
TEXTS = ["What is the capital of France?", "x",
         "Paris is the capital and largest city of France, on the Seine.",
         "Yes, the quick brown fox jumps over the lazy dog, and then it runs far away."]
QUERY = "what is the capital of France?"
DOCS = ["Paris is the capital of France.", "The cat is on the mat.",
        "France is in Europe, and its capital is Paris.", "No."]

COMMON = dict(intermediate_size=64, num_hidden_layers=3, max_position_embeddings=256,
              pad_token_id=0, eos_token_id=1, bos_token_id=2)
# case -> (transformers prefix, config): odd head counts, GQA and not, windows of 4 tokens
CASES = {
    "gemma": ("Gemma", dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
                            head_dim=20)),
    "gemma2": ("Gemma2", dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
                              head_dim=20, sliding_window=4, query_pre_attn_scalar=24,
                              attn_logit_softcapping=3.0, final_logit_softcapping=2.0)),
    "gemma3": ("Gemma3Text", dict(
        hidden_size=60, num_attention_heads=5, num_key_value_heads=5, head_dim=12,
        sliding_window=4, query_pre_attn_scalar=16, layer_types=[LOCAL, GLOBAL, LOCAL],
        rope_parameters={GLOBAL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                         LOCAL: {"rope_type": "default", "rope_theta": 100.0}})),
    "embeddinggemma": ("Gemma3Text", dict(
        hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
        sliding_window=4, query_pre_attn_scalar=16, use_bidirectional_attention=True,
        layer_types=[LOCAL, LOCAL, GLOBAL])),
}
PREFIX = {"gemma": "Gemma", "gemma2": "Gemma2", "gemma3": "Gemma3Text",
          "embeddinggemma": "Gemma3Text"}
# "Yes" and "No" open lines, so each is one token at the start of a text; "?\nB:" is common,
# so joining a query to the next piece would change its tokens.
CORPUS = ["Yes", "No", "Yes, it is.", "No, it is not.", *TEXTS, *DOCS, QUERY,
          "A: what is it?\nB: a passage.\n", "café naïve 東京 🚀"] * 20


@functools.cache
def _trained_bpe():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    # merges within words, as SentencePiece learns them (not whole repeated sentences)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in json.loads(tok.to_str())["model"]["merges"]]
    return tok.get_vocab(), merges


def gemma_tokenizer(directory) -> int:
    """A byte-fallback BPE trained on CORPUS as transformers' GemmaTokenizer builds one (spaces
    as "▁", <pad> 0, <eos> 1, <bos> 2, <unk> 3, <bos> added before each text). Returns the
    vocabulary size."""
    vocab, merges = _trained_bpe()
    transformers.GemmaTokenizer(vocab=vocab, merges=merges).save_pretrained(directory)
    return len(vocab)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Sharp attention and norms away from (1 + 0), unlike transformers' init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise * p.shape[1] ** -0.5 if p.ndim == 2 else 0.3 * noise)
    return model.eval()


def checkpoint(directory, case: str, task: str = "Model", seed: int = 0, **overrides):
    """A tiny random transformers Gemma `case` of `task`, saved with the Gemma-style tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = gemma_tokenizer(directory)
    prefix, config = CASES[case]
    config = getattr(transformers, f"{prefix}Config")(
        vocab_size=vocab, **{**COMMON, **config, **overrides})
    randomize(getattr(transformers, f"{prefix}{task}")(config), seed).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bodies(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma")
    return {case: checkpoint(root / case, case, seed=i) for i, case in enumerate(CASES)}


def ours_class(architecture: str):
    module, name = ARCHITECTURES[architecture]
    return getattr(module, name)


def sequences(vocab: int, seed: int = 0) -> list[list[int]]:
    """<bos> then random ids past the special tokens (never <pad>, which the classifiers skip)."""
    gen = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(5, vocab, (n - 1,), generator=gen).tolist() for n in LENGTHS]


def forward_both(ours, hf, ids):
    """Our packed forward over every sequence at once, and transformers' on each alone."""
    batch = PackedBatch.build(ids, None, torch.device("cpu"))
    with torch.no_grad():
        return batch, ours(batch), [hf(torch.tensor([s])) for s in ids]


def max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape
    return (got - want).abs().max().item()


@pytest.mark.parametrize("optimized", [False, True], ids=["torch", "cpu-path"])
@pytest.mark.parametrize("case", CASES)
def test_body_matches_transformers(bodies, case, optimized):
    hf = transformers.AutoModel.from_pretrained(bodies[case]).eval()
    ours = load_ours(ours_class(f"{PREFIX[case]}Model"), bodies[case])
    assert list(ours.buffers()) == []  # nothing fill_weights would leave uninitialized
    if optimized:
        assert cpu.optimize(ours, native.load()) > 0  # as served: the native kernels
    _, hidden, outputs = forward_both(ours, hf, sequences(hf.config.vocab_size))
    assert max_diff(hidden, torch.cat([o.last_hidden_state[0] for o in outputs])) <= ATOL
    if case != "gemma":  # the sliding window reached past: the window mattered
        assert max(LENGTHS) > 2 * hf.config.sliding_window


def test_rope_per_layer_type(bodies):
    """Gemma3's global layers rotate with linear scaling, its sliding ones with their own base."""
    hf = transformers.AutoModel.from_pretrained(bodies["gemma3"])
    ours = load_ours(ours_class("Gemma3TextModel"), bodies["gemma3"])
    for kind in (GLOBAL, LOCAL):
        assert torch.allclose(ours.rotary[kind].rope.inv_freq(12, torch.device("cpu")),
                              getattr(hf.rotary_emb, f"{kind}_inv_freq"))


def test_legacy_gemma3_config(bodies, tmp_path):
    """Hub configs from before rope_parameters and layer_types: rope_theta, rope_local_base_freq,
    rope_scaling (global layers only) and sliding_window_pattern, read as transformers reads
    them."""
    directory = shutil.copytree(bodies["gemma3"], tmp_path / "legacy")
    config = json.loads((directory / "config.json").read_text())
    for key in ("rope_parameters", "layer_types"):
        del config[key]
    config.update(rope_theta=1e6, rope_local_base_freq=100.0, sliding_window_pattern=2,
                  rope_scaling={"type": "linear", "factor": 4.0})
    (directory / "config.json").write_text(json.dumps(config))
    hf = transformers.AutoModel.from_pretrained(directory).eval()
    assert list(hf.config.layer_types) == [LOCAL, GLOBAL, LOCAL]
    ours = load_ours(ours_class("Gemma3TextModel"), directory)
    _, hidden, outputs = forward_both(ours, hf, sequences(hf.config.vocab_size, seed=1))
    assert max_diff(hidden, torch.cat([o.last_hidden_state[0] for o in outputs])) <= ATOL


@pytest.mark.parametrize("case,task", [
    ("gemma", "ForSequenceClassification"), ("gemma2", "ForSequenceClassification"),
    ("gemma3", "ForSequenceClassification"), ("gemma", "ForTokenClassification"),
    ("gemma2", "ForTokenClassification")])
def test_heads_match_transformers(tmp_path, case, task):
    prefix = PREFIX[case]
    directory = checkpoint(tmp_path / "m", case, task, seed=5, num_labels=3)
    auto = transformers.AutoModelForSequenceClassification if "Sequence" in task \
        else transformers.AutoModelForTokenClassification
    hf = auto.from_pretrained(directory).eval()
    ours = load_ours(ours_class(f"{prefix}{task}"), directory)
    assert ours.num_labels == 3
    batch, hidden, outputs = forward_both(ours, hf, sequences(hf.config.vocab_size, seed=2))
    with torch.no_grad():
        if "Token" in task:  # a label per token
            logits, want = ours.head(hidden), torch.cat([o.logits[0] for o in outputs])
        else:
            logits = ours.head(sequence_rows(ours.head_pooling, hidden, batch.cu_seqlens, None))
            want = torch.stack([o.logits[0] for o in outputs])
    assert max_diff(logits, want) <= ATOL


def test_offline_embed_and_classify(bodies, tmp_path):
    """A causal body pools its last token; a Gemma2 classifier's probabilities; both packed."""
    directory = bodies["gemma2"]
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    hf = transformers.AutoModel.from_pretrained(directory).eval()
    with torch.no_grad():
        want = np.stack([torch.nn.functional.normalize(
            hf(**tok(t, return_tensors="pt")).last_hidden_state[0, -1], dim=-1).numpy()
            for t in TEXTS])
    with LLM(str(directory), **CPU) as llm:
        info = llm.engine.model("")
        assert info.implementation == "poolsvc" and info.pooling_type.name == "LAST"
        got = np.array([o.outputs.embedding for o in llm.embed(TEXTS)])
    assert np.abs(got - want).max() <= ATOL

    classifier = checkpoint(tmp_path / "clf", "gemma2", "ForSequenceClassification", seed=3,
                            num_labels=3)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(classifier).eval()
    with torch.no_grad():
        want = np.stack([torch.softmax(hf(**tok(t, return_tensors="pt")).logits[0], -1).numpy()
                         for t in TEXTS])
    with LLM(str(classifier), **CPU) as llm:
        assert llm.engine.model("").implementation == "poolsvc"
        got = np.array([o.outputs.probs for o in llm.classify(TEXTS)])
    assert np.abs(got - want).max() <= ATOL


PROMPTS = {"query": "task: search result | query: ", "document": "title: none | text: "}


def embedding_gemma(directory, body) -> tuple:
    """EmbeddingGemma's Sentence-Transformers layout, saved by sentence-transformers: the
    bidirectional body, mean pooling, two bias-free Dense layers (up, then back), Normalize, and
    its query / document prompts. Returns (directory, the SentenceTransformer)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    torch.manual_seed(7)
    transformer = Transformer(str(body))
    width = transformer.get_embedding_dimension()
    model = SentenceTransformer(modules=[
        transformer, Pooling(width, "mean"),
        Dense(width, 4 * width, bias=False, activation_function=torch.nn.Identity()),
        Dense(4 * width, width, bias=False, activation_function=torch.nn.Identity()),
        Normalize()], prompts=PROMPTS, device="cpu")
    model.save(str(directory))
    return directory, SentenceTransformer(str(directory), device="cpu")


@pytest.fixture(scope="module")
def st_gemma(bodies, tmp_path_factory):
    return embedding_gemma(tmp_path_factory.mktemp("st") / "embeddinggemma",
                           bodies["embeddinggemma"])


def test_embedding_gemma_sentence_transformers(st_gemma):
    directory, st = st_gemma
    want = st.encode(TEXTS, convert_to_numpy=True)
    want_query = st.encode(TEXTS, prompt_name="query", convert_to_numpy=True)
    with LLM(str(directory), **CPU) as llm:
        info = llm.engine.model("")
        assert info.implementation == "poolsvc" and info.pooling_type.name == "MEAN"
        got = np.array([o.outputs.embedding for o in llm.embed(TEXTS)])
        got_query = np.array([o.outputs.embedding
                              for o in llm.embed(TEXTS, prompt_name="query")])
    assert np.abs(got - want).max() <= ATOL
    assert np.abs(got_query - want_query).max() <= ATOL


def flag_reference(directory, query: str, documents: list[str], instruction: str | None = None,
                   answers=("Yes",)) -> np.ndarray:
    """FlagEmbedding's FlagLLMReranker.compute_score on transformers' causal LM: <bos>, "A: "
    + query, "\\n", "B: " + passage, "\\n", the prompt, each tokenized apart; the logit of "Yes"
    at the last token (with two answers: the softmax of the second over the first)."""
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    ids_of = [tok(a, add_special_tokens=False)["input_ids"][0] for a in answers]
    prompt = tok(instruction or BGE_GEMMA.instruction, add_special_tokens=False)["input_ids"]
    sep = tok("\n", add_special_tokens=False)["input_ids"]
    scores = []
    with torch.no_grad():
        for doc in documents:
            ids = ([tok.bos_token_id] + tok(f"A: {query}", add_special_tokens=False)["input_ids"]
                   + sep + tok(f"B: {doc}", add_special_tokens=False)["input_ids"] + sep
                   + prompt)
            logits = model(torch.tensor([ids])).logits[0, -1, ids_of]
            scores.append(logits[0].item() if len(answers) == 1
                          else torch.softmax(logits, -1)[1].item())
    return np.array(scores)


@pytest.fixture(scope="module")
def bge_gemma(tmp_path_factory):
    """Named as the hub's BAAI/bge-reranker-v2-gemma, so the template applies unasked."""
    return checkpoint(tmp_path_factory.mktemp("rr") / "bge-reranker-v2-gemma-tiny", "gemma",
                      "ForCausalLM", seed=11)


def test_bge_reranker_v2_gemma(bge_gemma):
    tok = transformers.AutoTokenizer.from_pretrained(bge_gemma)
    assert len(tok("Yes", add_special_tokens=False)["input_ids"]) == 1
    logits = flag_reference(bge_gemma, QUERY, DOCS)
    assert logits.std() > 0.01  # the documents are told apart, far above the tolerance
    with LLM(str(bge_gemma), **CPU) as llm:
        info = llm.engine.model("")
        assert [t.value for t in info.tasks] == ["score"] and info.implementation == "poolsvc"
        got = np.array([o.outputs.score for o in llm.score(QUERY, DOCS)])
        raw = np.array([o.outputs.score for o in llm.score(QUERY, DOCS,
                                                           PoolingParams(activation=False))])
    assert np.abs(raw - logits).max() <= 1e-5  # FlagEmbedding's compute_score()
    assert np.abs(got - 1 / (1 + np.exp(-logits))).max() <= 1e-5  # ... (normalize=True)
    # the pieces are tokenized apart, as FlagEmbedding does: not the same as the joined text
    joined = tok(f"A: {QUERY}\nB: {DOCS[0]}\n", add_special_tokens=False)["input_ids"]
    apart = [i for t in (f"A: {QUERY}", "\n", f"B: {DOCS[0]}", "\n")
             for i in tok(t, add_special_tokens=False)["input_ids"]]
    assert joined != apart


def test_gemma2_reranker_softcaps_answer_logits(tmp_path):
    """Gemma2's final_logit_softcapping applies to the answer logits: one answer (its capped
    logit) and two (the softmax over both capped logits), with the template asked for by name
    and a custom instruction."""
    directory = checkpoint(tmp_path / "g2", "gemma2", "ForCausalLM", seed=12)
    config = {"score_template": "bge-reranker-v2-gemma", "score_instruction": "Is B relevant?"}
    for answers in (("Yes",), ("No", "Yes")):
        want = flag_reference(directory, QUERY, DOCS, "Is B relevant?", answers)
        assert np.abs(want).max() <= 2.0 + 1e-6  # capped
        with LLM(str(directory), pooler_config={**config, "answer_tokens": list(answers)},
                 **CPU) as llm:
            got = np.array([o.outputs.score for o in llm.score(
                QUERY, DOCS, PoolingParams(activation=len(answers) == 2))])
        assert np.abs(got - want).max() <= 1e-5


def test_truncation_cuts_the_document(bge_gemma):
    """An over-long pair loses the end of its document's piece; the prompt stays whole."""
    tok = transformers.AutoTokenizer.from_pretrained(bge_gemma)
    long_doc = " ".join(DOCS * 20)
    with LLM(str(bge_gemma), **CPU) as llm:
        (out,) = llm.score(QUERY, long_doc, truncate_prompt_tokens=150)
        assert len(out.prompt_token_ids) == 150
        prompt = tok(BGE_GEMMA.instruction, add_special_tokens=False)["input_ids"]
        assert out.prompt_token_ids[-len(prompt):] == prompt
        with pytest.raises(Exception, match="leaves no room for pair 0's document"):
            llm.score(QUERY, long_doc, truncate_prompt_tokens=len(prompt) + 3)


def test_bidirectional_needs_gemma3(bodies, tmp_path):
    directory = shutil.copytree(bodies["gemma2"], tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config,
                                                       "use_bidirectional_attention": True}))
    with pytest.raises(ModelLoadError, match="does not describe a usable.*Gemma3 text"):
        LLM(str(directory), **CPU)


def test_grpc_embedding_gemma_and_reranker(st_gemma, bge_gemma, tmp_path):
    directory, st = st_gemma
    want_embed = st.encode(TEXTS, prompt_name="document", convert_to_numpy=True)
    want_scores = 1 / (1 + np.exp(-flag_reference(bge_gemma, QUERY, DOCS)))
    srv = ServerProcess(tmp_path / "server.log", "--model", f"embed={directory}",
                        "--model", f"rr={bge_gemma}").wait_ready()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            reply = embed_pb2_grpc.EmbedServiceStub(channel).Embed(embed_pb2.EmbedRequest(
                model="embed", inputs=[common_pb2.Input(text=t) for t in TEXTS],
                prompt_name="document"), timeout=60)
            assert np.abs(decode_tensor(reply.embeddings) - want_embed).max() <= ATOL
            reply = score_pb2_grpc.ScoreServiceStub(channel).Rerank(score_pb2.RerankRequest(
                model="rr", query=common_pb2.Input(text=QUERY),
                documents=[common_pb2.Input(text=d) for d in DOCS]), timeout=60)
            assert [r.index for r in reply.results] == list(np.argsort(-want_scores))
            got = np.array([r.score for r in sorted(reply.results, key=lambda r: r.index)])
            assert np.abs(got - want_scores).max() <= 1e-5
    finally:
        assert srv.terminate() == 0
