"""Embeddings over gRPC equal sentence-transformers' and the offline API's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TEXTS
from poolsvc_client import decode_tensor

from poolsvc.gen.v1 import common_pb2, embed_pb2, embed_pb2_grpc, tensor_pb2


def _request(texts, **fields) -> embed_pb2.EmbedRequest:
    return embed_pb2.EmbedRequest(inputs=[common_pb2.Input(text=t) for t in texts], **fields)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def stub(channel):
    return embed_pb2_grpc.EmbedServiceStub(channel)


@pytest.fixture(scope="module")
def reference(st_model):
    return st_model.encode(TEXTS, convert_to_numpy=True)


def test_embed_equals_sentence_transformers(stub, reference):
    response = stub.Embed(_request(TEXTS))
    assert response.model == "all-MiniLM-L6-v2"
    assert response.embeddings.dtype == tensor_pb2.DATA_TYPE_FLOAT32
    assert list(response.embeddings.shape) == [len(TEXTS), 384]
    assert len(response.embeddings.data) == len(TEXTS) * 384 * 4
    got = decode_tensor(response.embeddings)
    assert _cosine(got, reference).min() >= 0.99999
    np.testing.assert_allclose(got, reference, atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_usage_and_timing(stub, st_model):
    response = stub.Embed(_request(TEXTS))
    expected = [len(st_model.tokenizer(t)["input_ids"]) for t in TEXTS]
    assert list(response.usage.input_tokens) == expected
    assert response.usage.total_tokens == sum(expected)
    t = response.timing
    assert t.total_ns >= t.tokenization_ns + t.queue_ns + t.inference_ns > 0
    assert t.inference_ns > 0


def test_embed_stream_equals_sentence_transformers(stub, reference):
    requests = [embed_pb2.EmbedStreamRequest(id=f"r{i}", request=_request([t]))
                for i, t in enumerate(TEXTS)]
    requests.append(embed_pb2.EmbedStreamRequest(id="all", request=_request(TEXTS)))
    responses = {r.id: r for r in stub.EmbedStream(iter(requests))}
    assert set(responses) == {r.id for r in requests}
    for i, _ in enumerate(TEXTS):
        r = responses[f"r{i}"]
        assert r.WhichOneof("result") == "response"
        got = decode_tensor(r.response.embeddings)
        assert got.shape == (1, 384)
        assert _cosine(got[0], reference[i]) >= 0.99999
    np.testing.assert_allclose(decode_tensor(responses["all"].response.embeddings), reference,
                               atol=2e-6)


def test_bytes_decode_to_the_offline_api_numbers(stub, llm):
    offline = np.array([o.outputs.embedding for o in llm.embed(TEXTS)], dtype=np.float32)
    response = stub.Embed(_request(TEXTS))
    raw = np.frombuffer(response.embeddings.data, dtype="<f4").reshape(len(TEXTS), 384)
    np.testing.assert_allclose(raw, offline, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(tensor_pb2.DATA_TYPE_FLOAT16, 1e-3),
                                       (tensor_pb2.DATA_TYPE_BFLOAT16, 8e-3)])
def test_half_precision_outputs(stub, reference, dtype, tol):
    response = stub.Embed(_request(TEXTS, output_dtype=dtype))
    assert response.embeddings.dtype == dtype
    assert len(response.embeddings.data) == len(TEXTS) * 384 * 2
    np.testing.assert_allclose(decode_tensor(response.embeddings), reference, atol=tol)


def test_matryoshka_truncates_then_normalizes(stub, reference):
    response = stub.Embed(_request(TEXTS, dimensions=64))
    got = decode_tensor(response.embeddings)
    assert got.shape == (len(TEXTS), 64)
    want = reference[:, :64] / np.linalg.norm(reference[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_normalize_off_returns_the_raw_pooled_vectors(stub, st_model):
    got = decode_tensor(stub.Embed(_request(TEXTS, normalize=False)).embeddings)
    # The reference pipeline ends in a Normalize module: take its Transformer output and pool.
    features = st_model.tokenize(TEXTS)
    with torch.no_grad():
        hidden = st_model[0](features)["token_embeddings"]
    mask = features["attention_mask"].unsqueeze(-1).float()
    mean = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    np.testing.assert_allclose(got, mean, atol=2e-6)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)


def test_token_ids_input_equals_text_input(stub, st_model, reference):
    ids = [st_model.tokenizer(t)["input_ids"] for t in TEXTS]
    request = embed_pb2.EmbedRequest(
        inputs=[common_pb2.Input(tokens=common_pb2.TokenIds(ids=i)) for i in ids])
    np.testing.assert_allclose(decode_tensor(stub.Embed(request).embeddings), reference,
                               atol=2e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_matches_the_tokenizer(stub, st_model, side):
    text = " ".join(f"word{i}" for i in range(400))
    tok = st_model.tokenizer
    tok.truncation_side = side
    try:
        want = st_model.encode([text], convert_to_numpy=True)  # ST truncates at 256
        ids = tok(text, truncation=True, max_length=256)["input_ids"]
    finally:
        tok.truncation_side = "right"
    sides = {"right": common_pb2.TRUNCATION_SIDE_RIGHT, "left": common_pb2.TRUNCATION_SIDE_LEFT}
    response = stub.Embed(_request([text], truncation=common_pb2.TruncationOptions(
        enabled=True, side=sides[side])))
    assert list(response.usage.input_tokens) == [256]
    np.testing.assert_allclose(decode_tensor(response.embeddings), want, atol=2e-6)
    short = stub.Embed(_request([text], truncation=common_pb2.TruncationOptions(
        max_tokens=32, side=sides[side])))
    assert list(short.usage.input_tokens) == [32]
    by_ids = stub.Embed(embed_pb2.EmbedRequest(inputs=[common_pb2.Input(
        tokens=common_pb2.TokenIds(ids=ids))]))
    np.testing.assert_allclose(decode_tensor(by_ids.embeddings), want, atol=2e-6)


def test_literal_prompt_is_prepended(stub, st_model):
    got = decode_tensor(stub.Embed(_request(["what is poolsvc?"], prompt="query: ")).embeddings)
    want = st_model.encode(["query: what is poolsvc?"], convert_to_numpy=True)
    np.testing.assert_allclose(got, want, atol=2e-6)
