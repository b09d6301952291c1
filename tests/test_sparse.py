"""Sparse (SPLADE) embeddings against sentence-transformers' SparseEncoder: offline, over gRPC,
streamed, through the Python client and grpcurl, and their errors."""

from __future__ import annotations

import base64
import json

import grpc
import numpy as np
import pytest
from conftest import ServerProcess
from poolsvc_client import Client
from test_grpcurl import grpcurl
from tiny_models import splade

from poolsvc import LLM
from poolsvc.engine.errors import InvalidInputError, ModelLoadError
from poolsvc.gen.v1 import (
    common_pb2,
    embed_pb2,
    embed_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
    tensor_pb2,
)

CPU = dict(device="cpu", threads=2)
TEXTS = ["hello world", "The cat sat on the mat.", "", "Paris is the capital of France, and "
         "its largest city: " + "many words " * 20]


def reference(directory) -> np.ndarray:
    from sentence_transformers import SparseEncoder
    model = SparseEncoder(str(directory), device="cpu")
    return model.encode(TEXTS, convert_to_sparse_tensor=False).numpy()  # [N, vocab]


def by_weight(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.flatnonzero(row)
    ids = ids[np.argsort(-row[ids], kind="stable")]
    return ids, row[ids]


def check_sparse(ids, weights, row: np.ndarray, k: int | None = None) -> None:
    """`ids` / `weights` are `row`'s non-zero entries, largest first (its k largest): each
    weight within 1e-4 of the reference's, the same set up to near-ties."""
    ids, weights = np.asarray(ids), np.asarray(weights)
    assert np.all(np.diff(weights) <= 0) and ids.dtype == np.int32
    _, want = by_weight(row)
    want = want[:k]
    assert len(ids) == len(want)
    np.testing.assert_allclose(weights, want, atol=1e-4)
    np.testing.assert_allclose(row[ids], weights, atol=1e-4)


@pytest.fixture(scope="module")
def sparse_encoder(tmp_path_factory, minilm_path):
    return splade(tmp_path_factory.mktemp("splade"), minilm_path)


@pytest.mark.parametrize("strategy,activation", [("max", "relu"), ("sum", "log1p_relu")])
def test_sparse_encoder_layouts_match(tmp_path, minilm_path, strategy, activation):
    directory = splade(tmp_path, minilm_path, strategy=strategy, activation=activation)
    want = reference(directory)
    with LLM(str(directory), **CPU) as llm:
        info = llm.engine.model("")
        assert [t.value for t in info.tasks] == ["embed"] and info.embed_dimensions == 30522
        assert info.pooling_type.value == "SPLADE" and info.implementation == "poolsvc"
        got = np.array([o.outputs.embedding for o in llm.embed(TEXTS)])
    assert (got > 0).sum() > 1000  # a random model: many non-zero weights
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_other_masked_lms_through_transformers(tmp_path, minilm_path):
    """DistilBERT (the OpenSearch sparse encoders' body) has no packed code: its masked LM runs
    through transformers, its MLM head through the same SPLADE pooling."""
    directory = splade(tmp_path, minilm_path, family="distilbert")
    with LLM(str(directory), **CPU) as llm:
        assert llm.engine.model("").implementation == "transformers"
        got = np.array([o.outputs.embedding for o in llm.embed(TEXTS)])
    np.testing.assert_allclose(got, reference(directory), atol=1e-4)


def test_a_masked_lm_with_splade_pooling_config(tmp_path, minilm_path, sparse_encoder):
    """A plain BertForMaskedLM checkpoint with --pooler-config pooling_type SPLADE equals the
    SparseEncoder built on it; without it, a masked LM is a dense body as before."""
    plain = splade(tmp_path / "plain", minilm_path, layout="mlm")
    with LLM(str(plain), pooler_config={"pooling_type": "SPLADE"}, **CPU) as llm:
        got = np.array([o.outputs.embedding for o in llm.embed(TEXTS)])
    np.testing.assert_allclose(got, reference(sparse_encoder), atol=1e-4)
    with LLM(str(plain), **CPU) as llm:
        assert llm.engine.model("").kind.value == "embedding"
    with pytest.raises(ModelLoadError, match="SPLADE pooling needs a masked-LM checkpoint"):
        from tiny_models import decoder
        LLM(str(decoder(tmp_path / "dec", "Qwen3")), pooler_config={"pooling_type": "SPLADE"},
            **CPU)


def test_top_k_tokens_and_errors_offline(sparse_encoder, minilm_path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(sparse_encoder)
    want = reference(sparse_encoder)
    with LLM(str(sparse_encoder), **CPU) as llm:
        outs = llm.embed(TEXTS, sparse_top_k=7, return_tokens=True)
        for row, out in zip(want, outs):
            sparse = out.outputs.sparse
            check_sparse(sparse.token_ids, sparse.weights, row, 7)
            assert sparse.tokens == tokenizer.convert_ids_to_tokens(sparse.token_ids.tolist())
        with pytest.raises(InvalidInputError, match="dimensions does not apply to sparse"):
            from poolsvc import PoolingParams
            llm.embed("x", PoolingParams(dimensions=8))
        with pytest.raises(InvalidInputError, match="output_dtype int8 does not apply"):
            llm.embed("x", PoolingParams(out_dtype="int8"))
        with pytest.raises(InvalidInputError, match="sparse_top_k must be 0"):
            llm.embed("x", sparse_top_k=-1)
    with LLM(str(minilm_path), **CPU) as dense, \
            pytest.raises(InvalidInputError, match="sparse_top_k applies to sparse models"):
        dense.embed("x", sparse_top_k=3)


def test_over_grpc(sparse_encoder, minilm_path, tmp_path):
    want = reference(sparse_encoder)
    srv = ServerProcess(tmp_path / "server.log", "--model", f"minilm={minilm_path}",
                        "--model", f"splade={sparse_encoder}").wait_ready()
    try:
        with grpc.insecure_channel(srv.address) as channel, Client(srv.address) as client:
            stub = embed_pb2_grpc.EmbedServiceStub(channel)
            inputs = [common_pb2.Input(text=t) for t in TEXTS]
            reply = stub.Embed(embed_pb2.EmbedRequest(model="splade", inputs=inputs), timeout=60)
            assert reply.sparse_dimensions == 30522 and not reply.HasField("embeddings")
            for row, vector in zip(want, reply.sparse_embeddings):
                check_sparse(np.frombuffer(vector.token_ids, "<i4"),
                             np.frombuffer(vector.weights, "<f4"), row)

            vectors = client.embed_sparse(TEXTS, model="splade", top_k=5, return_tokens=True)
            for row, vector in zip(want, vectors):
                check_sparse(vector.token_ids, vector.weights, row, 5)
                assert len(vector.tokens) == 5 and vector.dense().shape == (30522,)
            streamed = dict(client.embed_stream([TEXTS[:2], TEXTS[2:]], model="splade"))
            for i, row in enumerate(want):
                vector = streamed[i // 2][i % 2]
                np.testing.assert_allclose(vector.dense(), row, atol=1e-4)
            with pytest.raises(ValueError, match="sparse model: use embed_sparse"):
                client.embed(TEXTS[:1], model="splade")

            info = model_pb2_grpc.ModelServiceStub(channel).GetModelInfo(
                model_pb2.GetModelInfoRequest(model="splade"), timeout=60).info
            assert info.pooling_type == common_pb2.POOLING_TYPE_SPLADE and \
                info.dimensions == 30522

            for request, message in [
                (embed_pb2.EmbedRequest(model="minilm", inputs=inputs, sparse_top_k=3),
                 "sparse_top_k applies to sparse models"),
                (embed_pb2.EmbedRequest(model="minilm", inputs=inputs, return_tokens=True),
                 "return_tokens applies to sparse models"),
                (embed_pb2.EmbedRequest(model="splade", inputs=inputs, dimensions=8),
                 "dimensions does not apply to sparse model splade"),
                (embed_pb2.EmbedRequest(model="splade", inputs=inputs,
                                        output_dtype=tensor_pb2.DATA_TYPE_INT8),
                 "does not apply to sparse model splade")]:
                with pytest.raises(grpc.RpcError) as err:
                    stub.Embed(request, timeout=60)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
                assert message in err.value.details()

        out = json.loads(grpcurl(srv.address, "poolsvc.v1.EmbedService/Embed", data=json.dumps(
            {"model": "splade", "inputs": [{"text": "hello world"}], "sparse_top_k": 3,
             "return_tokens": True})))
        from transformers import AutoTokenizer
        vector = out["sparseEmbeddings"][0]
        ids = np.frombuffer(base64.b64decode(vector["tokenIds"]), "<i4")
        check_sparse(ids, np.frombuffer(base64.b64decode(vector["weights"]), "<f4"), want[0], 3)
        assert vector["tokens"] == \
            AutoTokenizer.from_pretrained(sparse_encoder).convert_ids_to_tokens(ids.tolist())
    finally:
        assert srv.terminate() == 0
