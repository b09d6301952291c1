"""The engine core's contract: one request value, one pooler, declared backends; and the
fidelity defects found by reference tests (each against the reference library)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
import transformers
from tiny_models import _perturb, bert_classifier, bpe_tokenizer, tiny_bert

import poolsvc
from poolsvc import LLM, PoolingParams
from poolsvc.engine.backend import ModelBackend
from poolsvc.engine.errors import InvalidInputError
from poolsvc.gen.v1 import common_pb2, embed_pb2, embed_pb2_grpc, score_pb2, score_pb2_grpc

CPU = dict(device="cpu", threads=2)
QUERY = "What is the capital of France?"
DOCS = ["Paris is the capital and largest city of France.", "A cat is a small feline.",
        "The quick brown fox jumps over the lazy dog.", "Embeddings map text to vectors."]
TEXTS = [QUERY, *DOCS, "東京は日本の首都です。", "x"]


# --- 1, 2: cross-encoders as current sentence-transformers saves and scores them --------------

@pytest.mark.parametrize("layout,problem_type", [
    ("sentence-transformers", None), ("sentence-transformers", "regression"),
    ("transformers", "regression")])
def test_cross_encoders_as_sentence_transformers_scores_them(tmp_path, minilm_path, layout,
                                                             problem_type):
    """CrossEncoder(...).save_pretrained (v5+ layout: a Transformer-only modules.json, the
    activation in config_sentence_transformers.json) loads as a cross-encoder; a regression
    head (one label) is scored through sigmoid like CrossEncoder.predict."""
    from sentence_transformers import CrossEncoder

    extra = {"problem_type": problem_type} if problem_type else {}
    saved = body = bert_classifier(tmp_path / "hf", minilm_path, 1, **extra)
    if layout == "sentence-transformers":
        saved = tmp_path / "st"
        CrossEncoder(str(body), device="cpu").save_pretrained(str(saved))
        assert (saved / "modules.json").is_file()
    pairs = [(QUERY, d) for d in DOCS]
    want = CrossEncoder(str(saved), device="cpu").predict(pairs)
    with LLM(str(saved), **CPU) as llm:
        got = np.array([o.outputs.score for o in llm.score(QUERY, DOCS)])
        raw = np.array([o.outputs.score for o in llm.score(QUERY, DOCS,
                                                           PoolingParams(activation=False))])
    assert np.abs(got - want).max() <= 1e-5
    np.testing.assert_allclose(1 / (1 + np.exp(-raw)), got, atol=1e-6)  # sigmoid, not raw


def test_cross_encoder_configured_identity_is_kept(tmp_path, minilm_path):
    from sentence_transformers import CrossEncoder

    body = bert_classifier(tmp_path / "hf", minilm_path, 1, problem_type="regression")
    saved = tmp_path / "st"
    CrossEncoder(str(body), device="cpu", activation_fn=torch.nn.Identity()).save_pretrained(
        str(saved))
    want = CrossEncoder(str(saved), device="cpu").predict([(QUERY, d) for d in DOCS])
    with LLM(str(saved), **CPU) as llm:
        got = np.array([o.outputs.score for o in llm.score(QUERY, DOCS)])
        raw = np.array([o.outputs.score for o in llm.score(QUERY, DOCS,
                                                           PoolingParams(activation=False))])
    assert np.abs(got - want).max() <= 1e-5
    np.testing.assert_allclose(got, raw, atol=1e-6)  # the logits themselves, no sigmoid


# --- 3, 4: over gRPC -----------------------------------------------------------------------------

def test_score_with_an_embedding_model_refuses_activation(channel, llm):
    stub = score_pb2_grpc.ScoreServiceStub(channel)
    request = score_pb2.ScoreRequest(queries=[common_pb2.Input(text=QUERY)],
                                     documents=[common_pb2.Input(text=d) for d in DOCS],
                                     activation=False)
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "activation does not apply" in err.value.details() and "cosine" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Rerank(score_pb2.RerankRequest(query=common_pb2.Input(text=QUERY),
                                            documents=[common_pb2.Input(text=DOCS[0])],
                                            activation=True), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidInputError, match="activation does not apply"):
        llm.score(QUERY, DOCS, PoolingParams(activation=True))
    assert len(stub.Score(score_pb2.ScoreRequest(
        queries=request.queries, documents=request.documents), timeout=60).scores.shape) == 1


@pytest.mark.parametrize("max_tokens,kept", [(-1, 256), (10, 10)])
def test_truncation_max_tokens_alone_turns_truncation_on(channel, max_tokens, kept):
    """The proto: setting max_tokens turns truncation on; -1 means the model's maximum."""
    stub = embed_pb2_grpc.EmbedServiceStub(channel)
    long_text = "retrieval augmented generation " * 200  # about 600 tokens, over MiniLM's 256
    reply = stub.Embed(embed_pb2.EmbedRequest(
        inputs=[common_pb2.Input(text=long_text)],
        truncation=common_pb2.TruncationOptions(max_tokens=max_tokens)), timeout=60)
    assert list(reply.usage.input_tokens) == [kept]
    with pytest.raises(grpc.RpcError) as err:  # enabled=false and a length contradict
        stub.Embed(embed_pb2.EmbedRequest(
            inputs=[common_pb2.Input(text="x")],
            truncation=common_pb2.TruncationOptions(enabled=False, max_tokens=max_tokens)),
            timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- 5: decoder bodies through the transformers fallback pool their last token ------------------

DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=1)


# decoder families without packed code (Gemma has its own now: tests/test_models_gemma.py)
@pytest.mark.parametrize("family", ["Granite", "StableLm", "Olmo2"])
def test_fallback_decoders_default_to_last_pooling(tmp_path, family):
    directory = tmp_path / family
    directory.mkdir()
    vocab = bpe_tokenizer(directory, "decoder")
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(vocab_size=vocab, **DECODER)
    assert not getattr(config, "is_decoder", False)  # the case that used to fall back to CLS
    model = getattr(transformers, f"{family}Model")(config).eval()
    _perturb(model)
    model.save_pretrained(directory)
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    with torch.no_grad():
        want = np.stack([
            torch.nn.functional.normalize(
                model(**tok(t, return_tensors="pt")).last_hidden_state[0, -1], dim=-1).numpy()
            for t in TEXTS])
    with LLM(str(directory), **CPU) as llm:
        assert llm.engine.model("").pooling_type.name == "LAST"
        assert llm.engine.model("").implementation == "transformers"
        got = np.array([o.outputs.embedding for o in llm.embed(TEXTS)])
    assert np.abs(got - want).max() <= 1e-4


# --- 7: vLLM's offline spellings ----------------------------------------------------------------

def test_vllm_offline_spellings(tmp_path, minilm_path, llm):
    for name in ("EmbeddingRequestOutput", "ClassificationRequestOutput", "ScoringRequestOutput",
                 "PoolingRequestOutput", "EmbeddingOutput", "PoolingParams", "LLM"):
        assert hasattr(poolsvc, name), name
    (out,) = llm.embed(QUERY)
    assert isinstance(out, poolsvc.EmbeddingRequestOutput)
    assert isinstance(out, poolsvc.PoolingRequestOutput)
    assert PoolingParams(use_activation=False) == PoolingParams(activation=False)
    with pytest.raises(TypeError, match="no option softmax; poolsvc's options"):
        PoolingParams(softmax=True)

    # one PoolingParams per prompt, vLLM's list form, kept in prompt order
    mixed = llm.embed(TEXTS[:4], [PoolingParams(normalize=i % 2 == 0) for i in range(4)])
    norms = [np.linalg.norm(o.outputs.embedding) for o in mixed]
    assert abs(norms[0] - 1) < 1e-5 and abs(norms[2] - 1) < 1e-5
    assert abs(norms[1] - 1) > 1e-3 and abs(norms[3] - 1) > 1e-3
    alone = llm.embed(TEXTS[1], PoolingParams(normalize=False))[0].outputs.embedding
    np.testing.assert_allclose(mixed[1].outputs.embedding, alone, atol=1e-6)
    with pytest.raises(ValueError, match="one PoolingParams or a list of one per prompt"):
        llm.embed(TEXTS[:3], [PoolingParams()] * 2)

    # truncation the three ways vLLM spells it
    long_text = "retrieval " * 400
    lengths = {len(llm.embed(long_text, **kw)[0].prompt_token_ids) for kw in (
        dict(truncate_prompt_tokens=12),
        dict(pooling_params=PoolingParams(truncate_prompt_tokens=12)),
        dict(tokenization_kwargs={"truncation": True, "max_length": 12}))}
    assert lengths == {12}
    with pytest.raises(ValueError, match="tokenization_kwargs \\['padding'\\] are not supported"):
        llm.embed("x", tokenization_kwargs={"padding": True})

    # LLM(max_model_len=...), vLLM's dtype names, unknown options named
    with LLM(str(tiny_bert(tmp_path / "bert", minilm_path)), max_model_len=32, dtype="float",
             **CPU) as small:
        assert small.engine.model("").max_input_tokens == 32
        with pytest.raises(InvalidInputError, match="limit of 32"):
            small.embed(long_text)
    with pytest.raises(TypeError, match="unknown options \\['swap_space'\\]; poolsvc's options"):
        LLM(swap_space=4, **CPU)
    with pytest.raises(TypeError, match="quantize=...\\): int8 quantization was removed.*"
                       "use dtype=bfloat16"):
        LLM(quantize="int8", **CPU)
    with pytest.raises(ValueError, match="trust_remote_code=True.*not supported"):
        LLM(trust_remote_code=True, **CPU)


def test_offline_api_takes_any_number_of_inputs(llm, st_model):
    """Beyond the server's per-request limit: the offline API slices its own calls."""
    texts = [f"query number {i} about embeddings" for i in range(2100)]
    outs = llm.embed(texts, use_tqdm=True)
    assert len(outs) == 2100
    want = st_model.encode(texts[-3:], convert_to_numpy=True)
    np.testing.assert_allclose([o.outputs.embedding for o in outs[-3:]], want, atol=2e-6)
    assert len(llm.score(texts[0], texts[:600])) == 600


def test_every_backend_declares_the_contract(llm):
    backend = llm.engine.served("").backend
    assert isinstance(backend, ModelBackend)
    assert backend.kind.value == "embedding" and backend.head_pooling is None


@pytest.mark.parametrize("ids,bad", [([101, -1, 102], -1), ([101, 30522], 30522)])
def test_token_ids_outside_the_vocabulary_are_refused_offline(llm, ids, bad):
    """Pre-tokenized input reaches the embedding table only with ids in [0, vocab): a negative
    id would index from the end (or raise IndexError deep in the model)."""
    with pytest.raises(InvalidInputError, match=f"token id {bad}, outside the vocabulary"):
        llm.embed([{"prompt_token_ids": ids}])
