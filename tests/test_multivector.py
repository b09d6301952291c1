"""Multi-vector (ColBERT) models against sentence-transformers' MultiVectorEncoder, which loads
both its own layout and PyLate's: token vectors per side and MaxSim scores, offline, over gRPC,
streamed, through the Python client and grpcurl, and their errors."""

from __future__ import annotations

import base64
import json

import grpc
import numpy as np
import pytest
import torch
from poolsvc_client import Client
from test_grpcurl import grpcurl
from tiny_models import colbert

from poolsvc import LLM, PoolingParams
from poolsvc.engine.errors import InvalidInputError
from poolsvc.gen.v1 import (
    common_pb2,
    encode_pb2,
    encode_pb2_grpc,
    score_pb2,
    score_pb2_grpc,
    tensor_pb2,
)

CPU = dict(device="cpu", threads=2)
QUERIES = ["what is the capital of France?", "hello", "cats, dogs & mice!"]
LONG_QUERY = "a query far longer than the sixteen tokens that queries are expanded to " * 2
DOCUMENTS = ["Paris is the capital of France.", "Hello world!!! How are you?", "",
             "A long document, " * 6 + "with its end."]


def reference(directory, similarity_queries=QUERIES):
    """MultiVectorEncoder's query and document vectors and its MaxSim matrix."""
    from sentence_transformers import MultiVectorEncoder
    model = MultiVectorEncoder(str(directory), device="cpu")
    queries = model.encode_query(list(similarity_queries))
    documents = model.encode_document(DOCUMENTS)
    return queries, documents, model.similarity(queries, documents).numpy()


def check_vectors(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g = g if isinstance(g, torch.Tensor) else torch.from_numpy(np.array(g))
        assert g.shape == w.shape
        torch.testing.assert_close(g, w.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout,attend,similarity,family", [
    ("multi-vector-encoder", False, None, "bert"), ("pylate", True, "meanmaxsim", "bert"),
    ("multi-vector-encoder", False, None, "distilbert"),
    ("multi-vector-encoder", False, None, "electra")])
def test_layouts_match_multi_vector_encoder(tmp_path, minilm_path, layout, attend, similarity,
                                            family):
    """The MultiVectorEncoder layout (expansion tokens not attended to, MaxSim summed) and
    PyLate's (attended to, MaxSim averaged): vectors, 1:N and N:N scores, a long query cut.
    DistilBERT runs on the packed code (keys packed without the expansion), ELECTRA through
    transformers (its attention mask hides the expansion)."""
    directory = colbert(tmp_path, minilm_path, layout=layout, attend=attend,
                        similarity=similarity, family=family)
    queries, documents, scores = reference(directory, QUERIES + [LONG_QUERY])
    with LLM(str(directory), **CPU) as llm:
        info = llm.engine.model("")
        assert info.kind.value == "multi-vector" and info.embed_dimensions == 16
        assert info.implementation == ("transformers" if family == "electra" else "poolsvc")
        assert [t.value for t in info.tasks] == ["token_embed", "score"]
        got = llm.encode(QUERIES, pooling_task="token_embed", input_role="query")
        check_vectors([o.outputs.data for o in got], queries[:3])
        assert all(len(o.prompt_token_ids) == 16 for o in got)  # expanded with [MASK]
        got = llm.encode(DOCUMENTS, input_role="document")
        check_vectors([o.outputs.data for o in got], documents)
        check_vectors([o.outputs.data for o in llm.encode(DOCUMENTS)], documents)  # default
        got = llm.encode(LONG_QUERY, input_role="query", truncate_prompt_tokens=-1)
        check_vectors([got[0].outputs.data], queries[3:])
        with pytest.raises(InvalidInputError, match="as a query, more than the limit of 16"):
            llm.encode(LONG_QUERY, input_role="query")
        one_to_many = [o.outputs.score for o in llm.score(QUERIES[0], DOCUMENTS)]
        np.testing.assert_allclose(one_to_many, scores[0], atol=1e-4)
        zipped = [o.outputs.score for o in llm.score(QUERIES[:3], DOCUMENTS[:3])]
        np.testing.assert_allclose(zipped, np.diag(scores[:3, :3]), atol=1e-4)


def test_errors_offline(minilm_path, example_models):
    with LLM(str(example_models["colbert"]), **CPU) as llm:
        with pytest.raises(InvalidInputError, match="does not serve embed"):
            llm.embed("x")
        with pytest.raises(InvalidInputError, match="activation does not apply to score with "
                                                    "multi-vector model colbert"):
            llm.score("x", "y", PoolingParams(activation=True))
        with pytest.raises(ValueError, match="input_role must be 'query' or 'document'"):
            llm.encode("x", input_role="passage")
    with LLM(str(minilm_path), **CPU) as dense, \
            pytest.raises(InvalidInputError, match="input_role applies to late-interaction"):
        dense.encode("x", pooling_task="token_embed", input_role="query")


def test_over_grpc(examples_server, example_models):
    """Encode per side, Score and Rerank by MaxSim on the server, their streams, the client
    and grpcurl against MultiVectorEncoder; bad requests are INVALID_ARGUMENT naming the
    field."""
    queries, documents, scores = reference(example_models["colbert"])
    address = examples_server.address

    def inputs(texts):
        return [common_pb2.Input(text=t) for t in texts]

    def tensors(reply):
        return [np.frombuffer(t.data, "<f4").reshape(tuple(t.shape)) for t in reply.outputs]

    with grpc.insecure_channel(address) as channel, Client(address) as client:
        encode = encode_pb2_grpc.EncodeServiceStub(channel)
        score = score_pb2_grpc.ScoreServiceStub(channel)
        reply = encode.Encode(encode_pb2.EncodeRequest(
            model="colbert", inputs=inputs(QUERIES), input_role=common_pb2.INPUT_ROLE_QUERY),
            timeout=60)
        assert reply.task == common_pb2.TASK_TOKEN_EMBED
        check_vectors(tensors(reply), queries)
        check_vectors(client.encode_multi_vector(DOCUMENTS, model="colbert"), documents)
        check_vectors(client.encode_multi_vector(QUERIES, model="colbert", role="query"),
                      queries)
        streamed = dict(client.encode_stream([QUERIES[:2], QUERIES[2:]], model="colbert",
                                             task="token_embed", input_role="query"))
        check_vectors(streamed[0] + streamed[1], queries)
        reply = encode.Encode(encode_pb2.EncodeRequest(  # spans of the rows kept
            model="colbert", inputs=inputs(DOCUMENTS[:1]), return_offsets=True), timeout=60)
        spans = [(o.start, o.end) for o in reply.offsets[0].offsets]
        assert len(spans) == reply.outputs[0].shape[0]
        assert [DOCUMENTS[0][a:b] for a, b in spans if b] == \
            ["Paris", "is", "the", "capital", "of", "France"]  # no "."

        reply = score.Score(score_pb2.ScoreRequest(model="colbert", queries=inputs(QUERIES[:1]),
                                                   documents=inputs(DOCUMENTS)), timeout=60)
        np.testing.assert_allclose(np.frombuffer(reply.scores.data, "<f4"), scores[0],
                                   atol=1e-4)
        np.testing.assert_allclose(client.score(QUERIES[1], DOCUMENTS, model="colbert"),
                                   scores[1], atol=1e-4)
        ranked = client.rerank(QUERIES[0], DOCUMENTS, model="colbert", top_n=2)
        assert [r.index for r in ranked] == list(np.argsort(-scores[0])[:2])
        np.testing.assert_allclose([r.score for r in ranked], np.sort(scores[0])[::-1][:2],
                                   atol=1e-4)
        got = dict(client.score_stream([(QUERIES[:3], DOCUMENTS[:3]), (QUERIES[2], DOCUMENTS)],
                                       model="colbert"))
        np.testing.assert_allclose(got[0], np.diag(scores[:3, :3]), atol=1e-4)
        np.testing.assert_allclose(got[1], scores[2], atol=1e-4)

        for call, request, message in [
            (encode.Encode, encode_pb2.EncodeRequest(inputs=inputs(["x"]), input_role=1),
             "input_role applies to late-interaction (multi-vector) models"),
            (encode.Encode, encode_pb2.EncodeRequest(model="colbert", inputs=inputs(["x"]),
                                                     input_role=7),
             "input_role 7 is not an InputRole"),
            (encode.Encode, encode_pb2.EncodeRequest(model="colbert", input_role=1,
                                                     inputs=inputs([LONG_QUERY])),
             "more than the limit of 16"),
            (encode.Encode, encode_pb2.EncodeRequest(
                model="colbert", inputs=inputs(["x"]), task=common_pb2.TASK_CLASSIFY),
             "does not serve classify"),
            (score.Score, score_pb2.ScoreRequest(model="colbert", queries=inputs(["x"]),
                                                 documents=inputs(["y"]), activation=True),
             "activation does not apply to score with multi-vector model colbert"),
            (encode.Encode, encode_pb2.EncodeRequest(
                model="colbert", inputs=inputs(["x"]),
                output_dtype=tensor_pb2.DATA_TYPE_INT8, normalize=False),
             "output_dtype int8 quantizes normalized embeddings")]:
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
            assert message in err.value.details()

    out = json.loads(grpcurl(address, "poolsvc.v1.EncodeService/Encode", data=json.dumps(
        {"model": "colbert", "input_role": "INPUT_ROLE_QUERY", "inputs": [{"text": QUERIES[0]}]})))
    [tensor] = out["outputs"]
    got = np.frombuffer(base64.b64decode(tensor["data"]), "<f4").reshape(
        [int(n) for n in tensor["shape"]])
    check_vectors([got], queries[:1])
    out = json.loads(grpcurl(address, "poolsvc.v1.ScoreService/Rerank", data=json.dumps(
        {"model": "colbert", "query": {"text": QUERIES[0]},
         "documents": [{"text": d} for d in DOCUMENTS]})))
    assert [r.get("index", 0) for r in out["results"]] == list(np.argsort(-scores[0]))
