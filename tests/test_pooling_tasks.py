"""Pooling configuration and tasks through the offline API, against reference libraries."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TEXTS
from tiny_models import st_pipeline, tiny_bert

from poolsvc import LLM
from poolsvc.engine.errors import InvalidInputError, ModelLoadError
from poolsvc.engine.params import PoolingParams

CPU = dict(device="cpu", threads=2)
SHORT = TEXTS[:7]


@pytest.fixture(scope="module")
def body(tmp_path_factory, minilm_path):
    return tiny_bert(tmp_path_factory.mktemp("body"), minilm_path, seed=5)


def embeddings(outs) -> np.ndarray:
    return np.array([o.outputs.embedding for o in outs])


@pytest.mark.parametrize("mode", ["cls", "mean", "max", "lasttoken", "weightedmean",
                                  "mean_sqrt_len_tokens"])
def test_every_pooling_mode_with_dense_layers(tmp_path, body, mode):
    from sentence_transformers import SentenceTransformer
    directory = st_pipeline(tmp_path / "st", body, mode,
                            dense=((24, torch.nn.Tanh()), (16, torch.nn.Identity())))
    want = SentenceTransformer(str(directory), device="cpu").encode(SHORT, convert_to_numpy=True)
    with LLM(str(directory), **CPU) as llm:
        got = embeddings(llm.embed(SHORT))
        alone = embeddings([llm.embed([text])[0] for text in SHORT])  # one-sequence batches
        info = llm.engine.model("")
        assert info.embed_dimensions == 16
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(alone - want).max() <= 1e-4


def test_dense_without_normalize(tmp_path, body):
    from sentence_transformers import SentenceTransformer
    directory = st_pipeline(tmp_path / "st", body, "mean", dense=((32, torch.nn.Sigmoid()),),
                            normalize=False)
    want = SentenceTransformer(str(directory), device="cpu").encode(SHORT, convert_to_numpy=True)
    with LLM(str(directory), **CPU) as llm:
        got = embeddings(llm.embed(SHORT))
        assert not llm.engine.model("").normalize_default
    assert np.abs(got - want).max() <= 1e-4
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)


def test_pooler_config_overrides_the_model_files_and_requests_override_it(tmp_path, body,
                                                                         minilm_path):
    hidden = _hf_hidden(body, SHORT)
    mean = torch.stack([h.mean(0) for h in hidden]).numpy()
    config = {"pooling_type": "MEAN", "normalize": False}
    with LLM(str(body), pooler_config=config, **CPU) as llm:  # plain HF: CLS by default
        got = embeddings(llm.embed(SHORT))
        assert np.abs(got - mean).max() <= 1e-4
        normalized = embeddings(llm.embed(SHORT, PoolingParams(normalize=True)))
        want = mean / np.linalg.norm(mean, axis=1, keepdims=True)
        assert np.abs(normalized - want).max() <= 1e-4
    with LLM(str(body), **CPU) as llm:
        cls = torch.stack([h[0] for h in hidden])
        want = torch.nn.functional.normalize(cls, dim=-1).numpy()
        assert np.abs(embeddings(llm.embed(SHORT)) - want).max() <= 1e-4


def _hf_hidden(directory, texts) -> list[torch.Tensor]:
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            out.append(model(**tok(text, return_tensors="pt")).last_hidden_state[0])
    return out


def test_matryoshka_truncates_then_normalizes_and_honours_declared_sizes(tmp_path, body,
                                                                        minilm_path):
    directory = tiny_bert(tmp_path / "m", minilm_path, seed=5)
    config = json.loads((directory / "config.json").read_text())
    config["matryoshka_dimensions"] = [48, 32, 16]
    (directory / "config.json").write_text(json.dumps(config))
    with LLM(str(directory), **CPU) as llm:
        raw = embeddings(llm.embed(SHORT, PoolingParams(normalize=False)))
        got = embeddings(llm.embed(SHORT, PoolingParams(dimensions=16)))
        want = raw[:, :16] / np.linalg.norm(raw[:, :16], axis=1, keepdims=True)
        assert np.abs(got - want).max() <= 1e-5
        with pytest.raises(InvalidInputError, match="supports dimensions 16, 32, 48; got 20"):
            llm.embed("x", PoolingParams(dimensions=20))


def test_chunked_processing_averages_chunks_weighted_by_tokens(tmp_path, body):
    """Long inputs with chunking on: raw split into max-length chunks, each pooled, the
    token-weighted mean, then normalized again (vLLM's chunked path skips the last step)."""
    text = " ".join(f"token{i}" for i in range(200))  # far over the 128-token limit
    config = {"pooling_type": "MEAN", "enable_chunked_processing": True, "max_embed_len": 2048}
    with LLM(str(body), pooler_config=config, **CPU) as llm:
        (long,) = llm.embed(text)
        ids = long.prompt_token_ids
        assert len(ids) > 128
        chunks = [ids[i:i + 128] for i in range(0, len(ids), 128)]
        parts = llm.embed([{"prompt_token_ids": c} for c in chunks],
                          PoolingParams(normalize=False))
        weighted = sum(len(c) * np.array(p.outputs.embedding) for c, p in zip(chunks, parts))
        want = weighted / len(ids)
        want /= np.linalg.norm(want)
        np.testing.assert_allclose(long.outputs.embedding, want, atol=1e-5)
        with pytest.raises(InvalidInputError, match="limit of 2048"):
            llm.embed(" ".join(["word"] * 3000))
    with LLM(str(body), **CPU) as llm, pytest.raises(InvalidInputError, match="limit of 128"):
        llm.embed(text)  # without chunking, over-long inputs are refused


def test_bi_encoder_score_is_the_cosine(llm, st_model):
    from sentence_transformers.util import cos_sim
    queries = ["what is a cat?", "where is Paris?"]
    docs = ["a small feline", "the capital of France"]
    emb = st_model.encode(queries + docs, convert_to_tensor=True)
    full = cos_sim(emb[:2], emb[2:]).numpy()
    one_to_many = [o.outputs.score for o in llm.score(queries[0], docs)]
    np.testing.assert_allclose(one_to_many, full[0], atol=1e-5)
    many_to_one = [o.outputs.score for o in llm.score(queries, docs[1])]
    np.testing.assert_allclose(many_to_one, full[:, 1], atol=1e-5)
    zipped = [o.outputs.score for o in llm.score(queries, docs)]
    np.testing.assert_allclose(zipped, np.diag(full), atol=1e-5)
    with pytest.raises(InvalidInputError, match="cannot pair 2 queries with 3 documents"):
        llm.score(queries, docs + ["x"])
    with pytest.raises(InvalidInputError, match="at least one query and one document"):
        llm.score([], docs)


def test_token_embed_returns_every_token(llm, st_model):
    outs = llm.encode(SHORT, pooling_task="token_embed")
    for text, out in zip(SHORT, outs):
        want = st_model.encode(text, output_value="token_embeddings", convert_to_tensor=True)
        want = torch.nn.functional.normalize(want, dim=-1)
        assert out.outputs.data.shape == want.shape == (len(out.prompt_token_ids), 384)
        assert (out.outputs.data - want).abs().max() <= 1e-5
    raw = llm.encode(SHORT[:1], PoolingParams(normalize=False), pooling_task="token_embed")
    want = st_model.encode(SHORT[0], output_value="token_embeddings", convert_to_tensor=True)
    assert (raw[0].outputs.data - want).abs().max() <= 1e-5


def test_options_that_do_not_apply_are_errors(llm):
    with pytest.raises(InvalidInputError, match="activation does not apply to embed"):
        llm.embed("x", PoolingParams(activation=True))
    with pytest.raises(InvalidInputError, match="does not serve classify"):
        llm.classify("x")
    with pytest.raises(InvalidInputError, match="does not serve reward"):
        llm.reward("x")
    with pytest.raises(InvalidInputError, match="dimensions does not apply to encode"):
        llm.encode("x", PoolingParams(dimensions=3), pooling_task="token_embed")


def test_transformers_fallback_serves_other_encoders(tmp_path, minilm_path):
    """ELECTRA has no packed implementation here: it runs through transformers."""
    from sentence_transformers import SentenceTransformer
    from transformers import ElectraConfig, ElectraModel
    torch.manual_seed(0)
    body = tmp_path / "electra"
    ElectraModel(ElectraConfig(vocab_size=30522, embedding_size=32, hidden_size=48,
                               num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                               max_position_embeddings=128)).save_pretrained(body)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (body / name).write_bytes((minilm_path / name).read_bytes())
    directory = st_pipeline(tmp_path / "st", body, "mean")
    want = SentenceTransformer(str(directory), device="cpu").encode(TEXTS, convert_to_numpy=True)
    with LLM(str(directory), **CPU) as llm:
        assert llm.engine.model("").implementation == "transformers"
        got = embeddings(llm.embed(TEXTS, truncate_prompt_tokens=-1))
    assert np.abs(got - want).max() <= 1e-4


def test_step_pooling_needs_a_head(body):
    with pytest.raises(ModelLoadError, match="STEP pooling needs a reward or classification head"):
        LLM(str(body), pooler_config={"pooling_type": "STEP"}, **CPU)
