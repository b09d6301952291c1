"""BGE-M3's three embeddings from one forward pass, and its hybrid score, against FlagEmbedding's
BGEM3FlagModel, offline, over gRPC, streamed, through the Python client and grpcurl, and their
errors.

FlagEmbedding (1.4.2, the latest) installs but does not import with transformers 5 (it imports
the removed transformers.modeling_attn_mask_utils), so `reference` recomputes what
BGEM3FlagModel.encode and compute_score do (FlagEmbedding/inference/embedder/encoder_only/m3.py
and finetune/embedder/encoder_only/m3/modeling.py) on transformers' XLMRobertaModel, padded as
it pads: dense = normalize(h[CLS]); lexical weights = per token id the largest relu(sparse_linear
(h)) above 0, cls/eos/pad/unk dropped; colbert = normalize(colbert_linear(h[1:])) of the real
tokens; scores: dense q.p, lexical sum of shared ids' products, colbert sum of each query
vector's best match / query vectors, hybrid = weighted sum / sum of weights."""

from __future__ import annotations

import base64
import json

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from poolsvc_client import Client
from test_grpcurl import grpcurl

from poolsvc import LLM, PoolingParams
from poolsvc.engine.errors import InvalidInputError
from poolsvc.gen.v1 import (
    common_pb2,
    embed_pb2,
    embed_pb2_grpc,
    score_pb2,
    score_pb2_grpc,
)

CPU = dict(device="cpu", threads=2)
TEXTS = ["hello world", "The cat sat on the mat, the cat.", "", "a longer text " * 12]
QUERY = "where did the cat sit?"
WEIGHTS = {"dense": 0.4, "sparse": 0.2, "multi_vector": 0.4}
ALL = ("dense", "sparse", "multi_vector")


@pytest.fixture(scope="module")
def m3(example_models):
    return example_models["bge-m3"]


def reference(directory, texts):
    """Per text: (dense [H], lexical {id: weight}, colbert [T - 1, D]), as BGEM3FlagModel."""
    from transformers import AutoTokenizer, XLMRobertaModel
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = XLMRobertaModel.from_pretrained(directory, add_pooling_layer=False).eval()
    heads = {}
    for name in ("colbert_linear", "sparse_linear"):
        state = torch.load(directory / f"{name}.pt", weights_only=True)
        heads[name] = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        heads[name].load_state_dict(state)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
        dense = F.normalize(hidden[:, 0], dim=-1)
        weights = torch.relu(heads["sparse_linear"](hidden))[..., 0]
        colbert = heads["colbert_linear"](hidden[:, 1:]) * batch["attention_mask"][:, 1:, None]
        colbert = F.normalize(colbert, dim=-1)
    unused = {tokenizer.convert_tokens_to_ids(tokenizer.special_tokens_map[t])
              for t in ("cls_token", "eos_token", "pad_token", "unk_token")}
    out = []
    for i, ids in enumerate(batch["input_ids"].tolist()):
        lexical = {}
        for token, w in zip(ids, weights[i].tolist()):
            if token not in unused and w > 0 and w > lexical.get(token, 0):
                lexical[token] = w
        count = int(batch["attention_mask"][i].sum())
        out.append((dense[i], lexical, colbert[i, :count - 1]))
    return out


def hybrid(query, document, weights=WEIGHTS) -> float:
    dense = float(query[0] @ document[0])
    lexical = sum(w * document[1].get(t, 0.0) for t, w in query[1].items())
    colbert = float((query[2] @ document[2].T).max(dim=1).values.sum() / query[2].shape[0])
    return (weights["dense"] * dense + weights["sparse"] * lexical +
            weights["multi_vector"] * colbert) / sum(weights.values())


def check(got_dense, got_ids, got_weights, got_vectors, want) -> None:
    dense, lexical, colbert = want
    if got_dense is not None:
        np.testing.assert_allclose(got_dense, dense.numpy(), atol=1e-4)
    if got_ids is not None:
        assert sorted(np.asarray(got_ids).tolist()) == sorted(lexical)
        np.testing.assert_allclose(got_weights, [lexical[int(t)] for t in got_ids], atol=1e-4)
        assert np.all(np.diff(got_weights) <= 0)  # largest first
    if got_vectors is not None:
        np.testing.assert_allclose(np.asarray(got_vectors), colbert.numpy(), atol=1e-4)


def test_offline_matches_flagembedding(m3):
    want = reference(m3, TEXTS)
    queries = reference(m3, [QUERY])
    with LLM(str(m3), **CPU) as llm:
        info = llm.engine.model("")
        assert info.bge_m3 and info.multi_vector_dimensions == 24
        outs = llm.embed(TEXTS, embedding_types=ALL)
        for out, w in zip(outs, want):
            o = out.outputs
            check(o.embedding, o.sparse.token_ids, o.sparse.weights, o.multi_vector, w)
        # each type alone, and the dense default, are the same numbers
        for out, w in zip(llm.embed(TEXTS, embedding_types=("sparse",), sparse_top_k=2), want):
            assert out.outputs.embedding == [] and out.outputs.multi_vector is None
            top = sorted(w[1].values(), reverse=True)[:2]
            np.testing.assert_allclose(out.outputs.sparse.weights, top, atol=1e-4)
        for out, w in zip(llm.embed(TEXTS), want):
            check(out.outputs.embedding, None, None, None, w)
        scores = [o.outputs.score for o in llm.score(QUERY, TEXTS, hybrid_weights=WEIGHTS)]
        np.testing.assert_allclose(scores, [hybrid(queries[0], w) for w in want], atol=1e-4)
        sparse_only = {"dense": 0, "sparse": 1, "multi_vector": 0}
        scores = [o.outputs.score for o in llm.score(QUERY, TEXTS, hybrid_weights=sparse_only)]
        np.testing.assert_allclose(scores, [hybrid(queries[0], w, sparse_only) for w in want],
                                   atol=1e-4)
        dense = [o.outputs.score for o in llm.score(QUERY, TEXTS)]  # unset: the dense score
        np.testing.assert_allclose(dense, [float(queries[0][0] @ w[0]) for w in want], atol=1e-4)

        with pytest.raises(InvalidInputError, match="hybrid_weights.sparse must be 0 or more"):
            llm.score(QUERY, TEXTS, hybrid_weights={"dense": 1, "sparse": -0.5})
        with pytest.raises(InvalidInputError, match="at least one weight above 0"):
            llm.score(QUERY, TEXTS, hybrid_weights={"dense": 0})
        with pytest.raises(InvalidInputError, match="dimensions applies to dense embeddings"):
            llm.embed("x", PoolingParams(dimensions=8), embedding_types=ALL)
        with pytest.raises(InvalidInputError, match="sparse_top_k applies to sparse embeddings"):
            llm.embed("x", embedding_types=("dense",), sparse_top_k=3)


def test_over_grpc(examples_server, m3):
    want = reference(m3, TEXTS)
    query = reference(m3, [QUERY])[0]
    expected = np.array([hybrid(query, w) for w in want])
    address = examples_server.address

    def inputs(texts):
        return [common_pb2.Input(text=t) for t in texts]

    def decode(t):
        return np.frombuffer(t.data, "<f4").reshape(tuple(t.shape))

    types = [common_pb2.EMBEDDING_TYPE_DENSE, common_pb2.EMBEDDING_TYPE_SPARSE,
             common_pb2.EMBEDDING_TYPE_MULTI_VECTOR]
    with grpc.insecure_channel(address) as channel, Client(address) as client:
        embed = embed_pb2_grpc.EmbedServiceStub(channel)
        score = score_pb2_grpc.ScoreServiceStub(channel)
        reply = embed.Embed(embed_pb2.EmbedRequest(model="bge-m3", inputs=inputs(TEXTS),
                                                   embedding_types=types), timeout=60)
        assert reply.sparse_dimensions == 400
        for i, w in enumerate(want):
            vector = reply.sparse_embeddings[i]
            check(decode(reply.embeddings)[i], np.frombuffer(vector.token_ids, "<i4"),
                  np.frombuffer(vector.weights, "<f4"), decode(reply.multi_vector_embeddings[i]),
                  w)
        got = client.embed_multi(TEXTS, model="bge-m3", top_k=100, return_tokens=True)
        for i, w in enumerate(want):
            check(got.dense[i], got.sparse[i].token_ids, got.sparse[i].weights,
                  got.multi_vector[i], w)
            assert len(got.sparse[i].tokens) == len(got.sparse[i].token_ids)
        got = client.embed_multi(TEXTS, model="bge-m3", types=("multi_vector",))
        assert got.dense is None and got.sparse is None
        streamed = dict(client.embed_stream([TEXTS[:2], TEXTS[2:]], model="bge-m3"))
        np.testing.assert_allclose(np.concatenate([streamed[0], streamed[1]]),
                                   np.stack([w[0].numpy() for w in want]), atol=1e-4)

        reply = score.Score(score_pb2.ScoreRequest(
            model="bge-m3", queries=inputs([QUERY]), documents=inputs(TEXTS),
            hybrid_weights=score_pb2.HybridWeights(**WEIGHTS)), timeout=60)
        np.testing.assert_allclose(decode(reply.scores), expected, atol=1e-4)
        ranked = client.rerank(QUERY, TEXTS, model="bge-m3", hybrid_weights=WEIGHTS)
        assert [r.index for r in ranked] == list(np.argsort(-expected, kind="stable"))
        got = dict(client.score_stream([(QUERY, TEXTS)], model="bge-m3", hybrid_weights=WEIGHTS))
        np.testing.assert_allclose(got[0], expected, atol=1e-4)

        for call, request, message in [
            (score.Score, score_pb2.ScoreRequest(
                model="bge-m3", queries=inputs([QUERY]), documents=inputs(TEXTS),
                hybrid_weights=score_pb2.HybridWeights(dense=1, multi_vector=-1)),
             "hybrid_weights.multi_vector must be 0 or more"),
            (score.Rerank, score_pb2.RerankRequest(
                model="bge-m3", query=common_pb2.Input(text=QUERY), documents=inputs(TEXTS),
                hybrid_weights=score_pb2.HybridWeights()),
             "hybrid_weights: give at least one weight above 0"),
            (score.Score, score_pb2.ScoreRequest(
                queries=inputs([QUERY]), documents=inputs(TEXTS),
                hybrid_weights=score_pb2.HybridWeights(dense=1)),
             "hybrid_weights applies to models with several embeddings"),
            (embed.Embed, embed_pb2.EmbedRequest(inputs=inputs(TEXTS), embedding_types=types[1:]),
             "embedding_types MULTI_VECTOR, SPARSE: all-MiniLM-L6-v2 gives DENSE"),
            (embed.Embed, embed_pb2.EmbedRequest(model="bge-m3", inputs=inputs(TEXTS),
                                                 embedding_types=[9]),
             "embedding_types 9 is not an EmbeddingType"),
            (embed.Embed, embed_pb2.EmbedRequest(model="bge-m3", inputs=inputs(TEXTS),
                                                 embedding_types=types, dimensions=8),
             "dimensions applies to dense embeddings alone")]:
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
            assert message in err.value.details()

    out = json.loads(grpcurl(address, "poolsvc.v1.EmbedService/Embed", data=json.dumps(
        {"model": "bge-m3", "inputs": [{"text": TEXTS[1]}],
         "embedding_types": ["EMBEDDING_TYPE_SPARSE", "EMBEDDING_TYPE_MULTI_VECTOR"]})))
    assert "embeddings" not in out
    vector = out["sparseEmbeddings"][0]
    [tensor] = out["multiVectorEmbeddings"]
    check(None, np.frombuffer(base64.b64decode(vector["tokenIds"]), "<i4"),
          np.frombuffer(base64.b64decode(vector["weights"]), "<f4"),
          np.frombuffer(base64.b64decode(tensor["data"]), "<f4").reshape(
              [int(n) for n in tensor["shape"]]), want[1])
    out = json.loads(grpcurl(address, "poolsvc.v1.ScoreService/Score", data=json.dumps(
        {"model": "bge-m3", "queries": [{"text": QUERY}], "documents": [{"text": TEXTS[1]}],
         "hybrid_weights": WEIGHTS})))
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(out["scores"]["data"]), "<f4"),
                               expected[1:2], atol=1e-4)
