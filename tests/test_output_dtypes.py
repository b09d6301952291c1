"""Compact output dtypes per request (INT8, UINT8, BINARY, UBINARY) against sentence-transformers'
quantize_embeddings, offline and over gRPC; and the errors when they do not apply."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from conftest import TEXTS
from poolsvc_client import Client, decode_tensor
from sentence_transformers import quantize_embeddings

from poolsvc import LLM, PoolingParams
from poolsvc.engine.errors import InvalidInputError
from poolsvc.gen.v1 import common_pb2, embed_pb2, embed_pb2_grpc, encode_pb2, encode_pb2_grpc
from poolsvc.gen.v1 import tensor_pb2 as t

WIRE = {"int8": t.DATA_TYPE_INT8, "uint8": t.DATA_TYPE_UINT8, "binary": t.DATA_TYPE_BINARY,
        "ubinary": t.DATA_TYPE_UBINARY}


def reference(vectors: np.ndarray, precision: str, r: float) -> np.ndarray:
    if precision.endswith("int8"):
        dims = vectors.shape[-1]
        ranges = np.array([[-r] * dims, [r] * dims], dtype=np.float32)
        return quantize_embeddings(vectors, precision, ranges=ranges)
    return quantize_embeddings(vectors, precision)


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_embed_dtypes_equal_quantize_embeddings(channel, llm, precision):
    floats = np.array([o.outputs.embedding for o in llm.embed(TEXTS)], dtype=np.float32)
    want = reference(floats, precision, 4 / math.sqrt(384))
    offline = np.stack([np.array(o.outputs.embedding) for o in
                        llm.embed(TEXTS, PoolingParams(out_dtype=precision))])
    stub = embed_pb2_grpc.EmbedServiceStub(channel)
    reply = stub.Embed(embed_pb2.EmbedRequest(inputs=[common_pb2.Input(text=x) for x in TEXTS],
                                              output_dtype=WIRE[precision]), timeout=60)
    served = decode_tensor(reply.embeddings)
    assert served.dtype == want.dtype and served.shape == want.shape
    # bit for bit, but a value within float rounding of a bucket edge may land one bucket over
    assert np.abs(served.astype(int) - want.astype(int)).max() <= (1 if "int8" in precision
                                                                   else 0)
    assert (served.astype(int) != want.astype(int)).mean() < 0.002
    np.testing.assert_array_equal(offline, served)
    if precision.endswith("binary"):
        assert served.shape == (len(TEXTS), 48)  # 384 bits in 48 bytes


def test_a_vector_does_not_depend_on_its_batch(channel):
    stub = embed_pb2_grpc.EmbedServiceStub(channel)
    for precision in WIRE.values():
        together = decode_tensor(stub.Embed(embed_pb2.EmbedRequest(
            inputs=[common_pb2.Input(text=x) for x in TEXTS], output_dtype=precision),
            timeout=60).embeddings)
        alone = decode_tensor(stub.Embed(embed_pb2.EmbedRequest(
            inputs=[common_pb2.Input(text=TEXTS[1])], output_dtype=precision),
            timeout=60).embeddings)
        np.testing.assert_array_equal(together[1], alone[0])


def test_matryoshka_and_token_embeddings_in_compact_dtypes(channel, llm):
    stub = embed_pb2_grpc.EmbedServiceStub(channel)
    reply = stub.Embed(embed_pb2.EmbedRequest(inputs=[common_pb2.Input(text=TEXTS[0])],
                                              dimensions=100, output_dtype=t.DATA_TYPE_UBINARY),
                       timeout=60)
    short = np.array(llm.embed(TEXTS[0], PoolingParams(dimensions=100))[0].outputs.embedding,
                     dtype=np.float32)
    np.testing.assert_array_equal(decode_tensor(reply.embeddings)[0],
                                  quantize_embeddings(short[None], "ubinary")[0])  # 13 bytes
    encode = encode_pb2_grpc.EncodeServiceStub(channel)
    tokens = encode.Encode(encode_pb2.EncodeRequest(
        inputs=[common_pb2.Input(text=TEXTS[1])], task=common_pb2.TASK_TOKEN_EMBED,
        output_dtype=t.DATA_TYPE_BINARY), timeout=60).outputs[0]
    floats = llm.encode(TEXTS[1], pooling_task="token_embed")[0].outputs.data.numpy()
    np.testing.assert_array_equal(decode_tensor(tokens), quantize_embeddings(floats, "binary"))


def test_a_configured_range_quantizes_unnormalized_vectors(tmp_path, minilm_path):
    r = 3.0
    with LLM(str(minilm_path), device="cpu", threads=2,
             pooler_config={"quantization_range": r}) as llm:
        raw = np.array([o.outputs.embedding for o in llm.embed(
            TEXTS, PoolingParams(normalize=False))], dtype=np.float32)
        got = np.stack([np.array(o.outputs.embedding) for o in llm.embed(
            TEXTS, PoolingParams(normalize=False, out_dtype="uint8"))])
    want = reference(raw, "uint8", r)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_compact_dtypes_only_where_there_are_vectors(server, llm):
    with pytest.raises(InvalidInputError, match="output_dtype int8 quantizes normalized"):
        llm.embed("x", PoolingParams(normalize=False, out_dtype="int8"))
    with pytest.raises(InvalidInputError, match="applies to embeddings"):
        llm.score("a", "b", PoolingParams(out_dtype="binary"))
    with Client(server.address) as client:
        vectors = client.embed(["a", "b"], dtype="ubinary")
    assert vectors.dtype == np.uint8 and vectors.shape == (2, 48)


def test_compact_dtypes_on_a_classifier_are_invalid(tmp_path, minilm_path):
    from tiny_models import bert_classifier
    directory = bert_classifier(tmp_path / "clf", minilm_path, 3)
    with LLM(str(directory), device="cpu", threads=2) as llm, \
            pytest.raises(InvalidInputError, match="output_dtype int8 applies to embeddings"):
        llm.classify("x", PoolingParams(out_dtype="int8"))


def test_the_wire_names_each_dtype(channel):
    stub = embed_pb2_grpc.EmbedServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(embed_pb2.EmbedRequest(inputs=[common_pb2.Input(text="x")], output_dtype=9),
                   timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "DATA_TYPE_INT8" in err.value.details() and "DATA_TYPE_UBINARY" in err.value.details()
