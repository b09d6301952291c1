"""Python client for poolsvc: texts in, numpy arrays out.

    from poolsvc_client import Client
    with Client("127.0.0.1:50051") as client:
        vectors = client.embed(["first text", "second text"])   # np.ndarray [2, D]

`AsyncClient` has the same methods as coroutines. Both need only grpcio, protobuf and numpy.
"""

from __future__ import annotations

from poolsvc_client.client import (
                                   AsyncClient,
                                   Client,
                                   StreamItemError,
                                   build_embed_request,
                                   channel_options,
                                   make_channel,
)
from poolsvc_client.tensors import decode_tensor

__all__ = ["AsyncClient", "Client", "StreamItemError", "build_embed_request", "channel_options",
           "decode_tensor", "make_channel"]
