"""Python client for poolsvc: texts in, numpy arrays out.

    from poolsvc_client import Client
    with Client("127.0.0.1:50051") as client:
        vectors = client.embed(["first text", "second text"])      # np.ndarray [2, D]
        ranked = client.rerank("a query", ["doc 1", "doc 2"], model="rerank")

`AsyncClient` has the same methods as coroutines. A failed call raises PoolsvcError (`.code`, a
grpc.StatusCode, and `.details`). Needs only grpcio, protobuf and numpy: the stubs it uses are
its own (`poolsvc_client.gen`), generated from the same protos as the server's.
"""

from __future__ import annotations

from poolsvc_client.build import (
    classify_request,
    embed_request,
    encode_request,
    rerank_request,
    score_request,
    tokenize_request,
)
from poolsvc_client.channel import channel_options, make_channel
from poolsvc_client.client import AsyncClient, Client
from poolsvc_client.errors import PoolsvcError, StreamItemError
from poolsvc_client.results import (
    Classification,
    MultiEmbedding,
    RerankResult,
    SparseVector,
    TokenLabels,
)
from poolsvc_client.tensors import decode_tensor

__version__ = "0.1.0"

build_embed_request = embed_request  # the name it had first

__all__ = ["AsyncClient", "Classification", "Client", "MultiEmbedding", "PoolsvcError",
           "RerankResult",
           "SparseVector", "StreamItemError", "TokenLabels", "build_embed_request",
           "channel_options", "classify_request", "decode_tensor", "embed_request",
           "encode_request", "make_channel", "rerank_request", "score_request",
           "tokenize_request"]
