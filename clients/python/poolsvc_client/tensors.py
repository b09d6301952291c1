"""Decoding poolsvc's packed tensors (little-endian bytes + dtype + shape) into numpy arrays."""

from __future__ import annotations

import numpy as np

from poolsvc_client.gen.v1 import tensor_pb2

_NUMPY = {
    tensor_pb2.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DATA_TYPE_INT8: np.dtype("i1"),
    tensor_pb2.DATA_TYPE_UINT8: np.dtype("u1"),
    tensor_pb2.DATA_TYPE_BINARY: np.dtype("i1"),   # packed sign bits: [N, ceil(D / 8)] bytes
    tensor_pb2.DATA_TYPE_UBINARY: np.dtype("u1"),
}


def decode_tensor(tensor) -> np.ndarray:
    """A poolsvc.v1.Tensor (the client's or the server's message class) as a numpy array;
    bfloat16 is widened to float32 (numpy has no bfloat16); int8, uint8 and the packed bits
    come as they were sent (sentence-transformers' quantize_embeddings layout)."""
    shape = tuple(tensor.shape)
    if tensor.dtype == tensor_pb2.DATA_TYPE_BFLOAT16:
        bits = np.frombuffer(tensor.data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    try:
        dtype = _NUMPY[tensor.dtype]
    except KeyError:
        raise ValueError(f"cannot decode dtype {tensor_pb2.DataType.Name(tensor.dtype)}") from None
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
