"""Proto messages <-> engine values. Validation of wire-level values happens here."""

from __future__ import annotations

import numpy as np

from poolsvc.engine.errors import InvalidInputError, UnsupportedError
from poolsvc.engine.outputs import EmbedOutput
from poolsvc.engine.params import (
    EmbedParams,
    OutputDType,
    PromptOptions,
    Timing,
    Truncation,
    TruncationSide,
)
from poolsvc.gen.v1 import common_pb2, embed_pb2, tensor_pb2

_DTYPES = {
    tensor_pb2.DATA_TYPE_UNSPECIFIED: OutputDType.FLOAT32,
    tensor_pb2.DATA_TYPE_FLOAT32: OutputDType.FLOAT32,
    tensor_pb2.DATA_TYPE_FLOAT16: OutputDType.FLOAT16,
    tensor_pb2.DATA_TYPE_BFLOAT16: OutputDType.BFLOAT16,
}
_WIRE_DTYPES = {
    OutputDType.FLOAT32: tensor_pb2.DATA_TYPE_FLOAT32,
    OutputDType.FLOAT16: tensor_pb2.DATA_TYPE_FLOAT16,
    OutputDType.BFLOAT16: tensor_pb2.DATA_TYPE_BFLOAT16,
}
_SIDES = {
    common_pb2.TRUNCATION_SIDE_UNSPECIFIED: TruncationSide.RIGHT,
    common_pb2.TRUNCATION_SIDE_RIGHT: TruncationSide.RIGHT,
    common_pb2.TRUNCATION_SIDE_LEFT: TruncationSide.LEFT,
}


def inputs(messages) -> list[str | list[int]]:
    out: list[str | list[int]] = []
    for i, msg in enumerate(messages):
        kind = msg.WhichOneof("content")
        if kind == "text":
            out.append(msg.text)
        elif kind == "tokens":
            out.append(list(msg.tokens.ids))
        elif kind == "image":
            raise InvalidInputError(f"input {i} is an image, but the model accepts text only")
        else:
            raise InvalidInputError(f"input {i} is empty: set text or tokens")
    return out


def output_dtype(value: int) -> OutputDType:
    try:
        return _DTYPES[value]
    except KeyError:
        pass
    if value in tensor_pb2.DataType.values():
        raise UnsupportedError(
            f"output_dtype {tensor_pb2.DataType.Name(value)} is not produced yet; use "
            "DATA_TYPE_FLOAT32, DATA_TYPE_FLOAT16 or DATA_TYPE_BFLOAT16")
    raise InvalidInputError(f"output_dtype {value} is not a DataType")


def truncation(request) -> Truncation:
    if not request.HasField("truncation"):
        return Truncation()
    msg = request.truncation
    if msg.side not in _SIDES:
        raise InvalidInputError(f"truncation side {msg.side} is not a TruncationSide")
    return Truncation(enabled=msg.enabled if msg.HasField("enabled") else None,
                      max_tokens=msg.max_tokens, side=_SIDES[msg.side])


def prompt(request) -> PromptOptions:
    return PromptOptions(name=request.prompt_name, text=request.prompt)


def embed_params(request) -> EmbedParams:
    return EmbedParams(
        normalize=request.normalize if request.HasField("normalize") else None,
        dimensions=request.dimensions if request.HasField("dimensions") else None,
        out_dtype=output_dtype(request.output_dtype))


def tensor(array: np.ndarray, dtype: OutputDType) -> tensor_pb2.Tensor:
    """Packed little-endian bytes in C order (bfloat16 arrives as its uint16 bits)."""
    little = array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)
    return tensor_pb2.Tensor(dtype=_WIRE_DTYPES[dtype], shape=array.shape, data=little.tobytes())


def usage(prompt_lens: list[int]) -> common_pb2.Usage:
    return common_pb2.Usage(input_tokens=prompt_lens, total_tokens=sum(prompt_lens))


def timing(t: Timing) -> common_pb2.Timing:
    return common_pb2.Timing(queue_ns=t.queue_ns, tokenization_ns=t.tokenization_ns,
                             inference_ns=t.inference_ns, total_ns=t.total_ns)


def embed_response(out: EmbedOutput) -> embed_pb2.EmbedResponse:
    return embed_pb2.EmbedResponse(model=out.model, embeddings=tensor(out.embeddings, out.dtype),
                                   usage=usage(out.prompt_lens), timing=timing(out.timing))
