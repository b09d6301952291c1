"""Calls every RPC through the Python client, blocking and asyncio, and prints the results as JSON.

    python tests/client_every_rpc.py 127.0.0.1:50051

It imports nothing but the client and its dependencies: tests/test_client_install.py runs it in
a fresh venv holding only `pip install ./clients/python`, against the examples server
(conftest.py: the bundled embedder as the default model, "clf", "rerank", "rm", "clip", "splade",
"ner", "colbert", "bge-m3").
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from google.protobuf.json_format import MessageToDict
from poolsvc_client import (
    AsyncClient,
    Classification,
    Client,
    MultiEmbedding,
    PoolsvcError,
    RerankResult,
    SparseVector,
    TokenLabels,
)

QUERY = "What is the capital of France?"
DOCS = ["Cats purr.", "Paris is the capital of France.", "The stock market fell today."]
TEXTS = ["Hello, my name is", "poolsvc speaks gRPC", "café naïve 🚀"]

# (label, method, args, options): every unary RPC, then every stream
UNARY = [
    ("health", "health", (), {}),
    ("health embed", "health", ("poolsvc.v1.EmbedService",), {}),
    ("list_models", "list_models", (), {}),
    ("model_info clf", "model_info", ("clf",), {}),
    ("tokenize", "tokenize", (TEXTS,), {}),
    ("embed", "embed", (TEXTS,), {}),
    ("embed 64 float16", "embed", ("a query",), {"dimensions": 64, "dtype": "float16"}),
    ("embed token ids", "embed", ([101, 7592, 1010, 2026, 2171, 2003, 102],), {}),
    ("classify", "classify", (TEXTS,), {"model": "clf"}),
    ("score cross-encoder", "score", (QUERY, DOCS), {"model": "rerank"}),
    ("score cosine", "score", (QUERY, DOCS), {}),
    ("rerank", "rerank", (QUERY, DOCS), {"model": "rerank", "top_n": 2,
                                         "return_documents": True}),
    ("encode token_embed", "encode", (TEXTS[:2],), {}),
    ("encode reward", "encode", (["Step 1: 2 + 2 = 4."],), {"model": "rm"}),
    ("embed_sparse", "embed_sparse", (TEXTS[:2],), {"model": "splade", "top_k": 4,
                                                    "return_tokens": True}),
    ("classify_tokens", "classify_tokens", (TEXTS[:2],), {"model": "ner"}),
    ("encode_multi_vector", "encode_multi_vector", (TEXTS[:2],), {"model": "colbert",
                                                                  "role": "query"}),
    ("score maxsim", "score", (QUERY, DOCS), {"model": "colbert"}),
    ("embed_multi", "embed_multi", (TEXTS[:2],), {"model": "bge-m3", "top_k": 3}),
    ("rerank hybrid", "rerank", (QUERY, DOCS), {"model": "bge-m3", "hybrid_weights": {
        "dense": 0.4, "sparse": 0.2, "multi_vector": 0.4}}),
]
STREAMS = [
    ("embed_stream", "embed_stream", ([TEXTS[:1], TEXTS[1:]],), {}),
    ("classify_stream", "classify_stream", ([TEXTS[:2], TEXTS[2:]],), {"model": "clf"}),
    ("score_stream", "score_stream", ([(QUERY, DOCS), (QUERY, DOCS[:1])],), {"model": "rerank"}),
    ("encode_stream", "encode_stream", ([TEXTS[:1], TEXTS[1:2]],), {}),
    ("embed_stream errors", "embed_stream", ([TEXTS[:1], []],), {"return_errors": True}),
]


def plain(value):
    """JSON-able form of a client result."""
    if isinstance(value, np.ndarray):
        return {"dtype": str(value.dtype), "shape": list(value.shape), "values": value.tolist()}
    if isinstance(value, Classification):
        return {"probs": plain(value.probs), "labels": value.labels,
                "predicted": value.predicted}
    if isinstance(value, SparseVector):
        return {"token_ids": value.token_ids.tolist(), "weights": plain(value.weights),
                "tokens": value.tokens, "dimensions": value.dimensions}
    if isinstance(value, MultiEmbedding):
        return {"dense": plain(value.dense), "sparse": plain(value.sparse),
                "multi_vector": plain(value.multi_vector)}
    if isinstance(value, TokenLabels):
        return {"probs": plain(value.probs), "labels": value.labels,
                "offsets": [list(o) for o in value.offsets]}
    if isinstance(value, RerankResult):
        return {"index": value.index, "score": value.score, "document": value.document}
    if isinstance(value, PoolsvcError):
        return {"error": value.code.name, "details": value.details}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "DESCRIPTOR"):  # a protobuf message (ModelInfo)
        return MessageToDict(value, preserving_proto_field_name=True)
    return value


def errors(client: Client) -> dict:
    out = {}
    try:
        client.embed("x", model="nope")
    except PoolsvcError as exc:
        out["unknown model"] = plain(exc)
    for label, options in (("dtype", {"dtype": "int4"}), ("task", {"task": "rerank"})):
        try:
            client.encode("x", **options)
        except ValueError as exc:
            out[label] = str(exc)
    return out


def run_sync(address: str) -> dict:
    with Client(address) as client:
        out = {label: plain(getattr(client, method)(*args, **options))
               for label, method, args, options in UNARY}
        for label, method, args, options in STREAMS:
            out[label] = plain(sorted(getattr(client, method)(*args, **options),
                                      key=lambda item: item[0]))
        out["errors"] = errors(client)
    return out


async def run_async(address: str) -> dict:
    async with AsyncClient(address) as client:
        out = {label: plain(await getattr(client, method)(*args, **options))
               for label, method, args, options in UNARY}
        for label, method, args, options in STREAMS:
            items = [item async for item in getattr(client, method)(*args, **options)]
            out[label] = plain(sorted(items, key=lambda item: item[0]))
        try:
            await client.classify("x")  # the default model embeds only
        except PoolsvcError as exc:
            out["errors"] = {"classify on an embedder": plain(exc)}
    return out


def main(address: str) -> dict:
    return {"sync": run_sync(address), "async": asyncio.run(run_async(address))}


if __name__ == "__main__":
    json.dump(main(sys.argv[1]), sys.stdout)
