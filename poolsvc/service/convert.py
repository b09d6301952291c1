"""Proto messages <-> engine values. Validation of wire-level values happens here."""

from __future__ import annotations

import numpy as np

from poolsvc.engine.errors import InvalidInputError, UnsupportedError
from poolsvc.engine.images import ImageInput
from poolsvc.engine.outputs import ClassifyOutput, EmbedOutput, EncodeOutput, ScoreOutput
from poolsvc.engine.params import (
    OutputDType,
    PoolingParams,
    PromptOptions,
    Task,
    Timing,
    Truncation,
    TruncationSide,
)
from poolsvc.gen.v1 import classify_pb2, common_pb2, embed_pb2, encode_pb2, score_pb2, tensor_pb2

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
_WIRE_TASKS = {t: common_pb2.Task.Value(f"TASK_{t.name}") for t in Task}
_TASKS_BY_WIRE = {v: k for k, v in _WIRE_TASKS.items()}
_SIDES = {
    common_pb2.TRUNCATION_SIDE_UNSPECIFIED: TruncationSide.RIGHT,
    common_pb2.TRUNCATION_SIDE_RIGHT: TruncationSide.RIGHT,
    common_pb2.TRUNCATION_SIDE_LEFT: TruncationSide.LEFT,
}


def inputs(messages, name: str = "input") -> list[str | list[int] | ImageInput]:
    out: list[str | list[int] | ImageInput] = []
    for i, msg in enumerate(messages):
        kind = msg.WhichOneof("content")
        if kind == "text":
            out.append(msg.text)
        elif kind == "tokens":
            out.append(list(msg.tokens.ids))
        elif kind == "image":
            out.append(ImageInput(msg.image.data, msg.image.mime_type))
        else:
            raise InvalidInputError(f"{name} {i} is empty: set text, tokens or image")
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


def pooling_params(request) -> PoolingParams:
    """The pooling options a request message has (each task's message has a subset)."""
    fields = request.DESCRIPTOR.fields_by_name

    def optional(name: str):
        return getattr(request, name) if name in fields and request.HasField(name) else None

    out_dtype = output_dtype(request.output_dtype) if "output_dtype" in fields \
        else OutputDType.FLOAT32
    return PoolingParams(normalize=optional("normalize"), dimensions=optional("dimensions"),
                         activation=optional("activation"), out_dtype=out_dtype)


def task(value: int) -> Task | None:
    if value == common_pb2.TASK_UNSPECIFIED:
        return None
    try:
        return _TASKS_BY_WIRE[value]
    except KeyError:
        raise InvalidInputError(f"task {value} is not a Task") from None


def wire_task(t: Task) -> int:
    return _WIRE_TASKS[t]


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


def classify_response(out: ClassifyOutput) -> classify_pb2.ClassifyResponse:
    return classify_pb2.ClassifyResponse(model=out.model, probs=tensor(out.probs, out.dtype),
                                         labels=out.labels, usage=usage(out.prompt_lens),
                                         timing=timing(out.timing))


def score_response(out: ScoreOutput) -> score_pb2.ScoreResponse:
    return score_pb2.ScoreResponse(model=out.model, scores=tensor(out.scores, OutputDType.FLOAT32),
                                   usage=usage(out.prompt_lens), timing=timing(out.timing))


def rerank_response(out: ScoreOutput, documents, top_n: int,
                    return_documents: bool) -> score_pb2.RerankResponse:
    order = np.argsort(-out.scores, kind="stable")[:top_n or None]
    results = [score_pb2.RerankResult(
        index=int(i), score=float(out.scores[i]),
        document=documents[i].text if return_documents and documents[i].HasField("text") else "")
        for i in order]
    return score_pb2.RerankResponse(model=out.model, results=results,
                                    usage=usage(out.prompt_lens), timing=timing(out.timing))


def encode_response(out: EncodeOutput) -> encode_pb2.EncodeResponse:
    return encode_pb2.EncodeResponse(model=out.model, task=wire_task(out.task),
                                     outputs=[tensor(a, out.dtype) for a in out.outputs],
                                     usage=usage(out.prompt_lens), timing=timing(out.timing))
