"""Proto messages <-> engine values: one function per request message builds the engine's
PoolingRequest; one per response message encodes the engine's output. Wire-level values (enum
numbers, empty oneofs) are validated here; what they mean is the engine's to decide."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

import numpy as np

from poolsvc.engine.config import Limits
from poolsvc.engine.errors import InvalidInputError
from poolsvc.engine.images import ImageInput
from poolsvc.engine.params import (
    EmbeddingType,
    HybridWeights,
    InputRole,
    OutputDType,
    PoolingParams,
    PromptOptions,
    SparseOptions,
    Task,
    Timing,
    Truncation,
    TruncationSide,
)
from poolsvc.engine.request import PoolingRequest, Prompt

if TYPE_CHECKING:  # the outputs module pulls in torch; only their types are needed here
    from poolsvc.engine.outputs import (
        ClassifyOutput,
        EmbedOutput,
        EncodeOutput,
        MultiEmbedOutput,
        ScoreOutput,
        SparseEmbedOutput,
        SparseVector,
    )
from poolsvc.gen.v1 import (
    classify_pb2,
    common_pb2,
    embed_pb2,
    encode_pb2,
    model_pb2,
    score_pb2,
    tensor_pb2,
)

_DTYPES = {
    tensor_pb2.DATA_TYPE_UNSPECIFIED: OutputDType.FLOAT32,
    tensor_pb2.DATA_TYPE_FLOAT32: OutputDType.FLOAT32,
    tensor_pb2.DATA_TYPE_FLOAT16: OutputDType.FLOAT16,
    tensor_pb2.DATA_TYPE_BFLOAT16: OutputDType.BFLOAT16,
    tensor_pb2.DATA_TYPE_INT8: OutputDType.INT8,
    tensor_pb2.DATA_TYPE_UINT8: OutputDType.UINT8,
    tensor_pb2.DATA_TYPE_BINARY: OutputDType.BINARY,
    tensor_pb2.DATA_TYPE_UBINARY: OutputDType.UBINARY,
}
_WIRE_DTYPES = {
    OutputDType.FLOAT32: tensor_pb2.DATA_TYPE_FLOAT32,
    OutputDType.FLOAT16: tensor_pb2.DATA_TYPE_FLOAT16,
    OutputDType.BFLOAT16: tensor_pb2.DATA_TYPE_BFLOAT16,
    OutputDType.INT8: tensor_pb2.DATA_TYPE_INT8,
    OutputDType.UINT8: tensor_pb2.DATA_TYPE_UINT8,
    OutputDType.BINARY: tensor_pb2.DATA_TYPE_BINARY,
    OutputDType.UBINARY: tensor_pb2.DATA_TYPE_UBINARY,
}
_WIRE_TASKS = {t: common_pb2.Task.Value(f"TASK_{t.name}") for t in Task}
_TASKS_BY_WIRE = {v: k for k, v in _WIRE_TASKS.items()}


class When(TypedDict):
    """A call's arrival and, if the client set one, its deadline (monotonic ns)."""

    arrival_ns: int
    deadline_ns: int | None


_ROLES = {
    common_pb2.INPUT_ROLE_UNSPECIFIED: None,
    common_pb2.INPUT_ROLE_QUERY: InputRole.QUERY,
    common_pb2.INPUT_ROLE_DOCUMENT: InputRole.DOCUMENT,
}
_EMBEDDING_TYPES = {
    common_pb2.EMBEDDING_TYPE_DENSE: EmbeddingType.DENSE,
    common_pb2.EMBEDDING_TYPE_SPARSE: EmbeddingType.SPARSE,
    common_pb2.EMBEDDING_TYPE_MULTI_VECTOR: EmbeddingType.MULTI_VECTOR,
}
_SIDES = {
    common_pb2.TRUNCATION_SIDE_UNSPECIFIED: TruncationSide.RIGHT,
    common_pb2.TRUNCATION_SIDE_RIGHT: TruncationSide.RIGHT,
    common_pb2.TRUNCATION_SIDE_LEFT: TruncationSide.LEFT,
}


def inputs(messages, limits: Limits, name: str = "input") -> tuple[Prompt, ...]:
    """The engine's inputs; their number and the number of token ids are checked before any
    is converted (a token id is a Python int once converted: the limits bound that memory)."""
    limits.check_inputs(len(messages))
    limits.check_token_ids([len(m.tokens.ids) for m in messages if m.HasField("tokens")])
    out: list[Prompt] = []
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
    return tuple(out)


def output_dtype(value: int) -> OutputDType:
    try:
        return _DTYPES[value]
    except KeyError:
        names = ", ".join(tensor_pb2.DataType.Name(v) for v in _WIRE_DTYPES.values())
        raise InvalidInputError(f"output_dtype {value} is not a DataType; use one of {names}"
                                ) from None


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


def _optional(request, name: str):
    return getattr(request, name) if request.HasField(name) else None


# --- one function per request message: proto -> the engine's PoolingRequest -----------------

def embed_request(msg: embed_pb2.EmbedRequest, when: When, limits: Limits) -> PoolingRequest:
    params = PoolingParams(normalize=_optional(msg, "normalize"),
                           dimensions=_optional(msg, "dimensions"),
                           out_dtype=output_dtype(msg.output_dtype))
    return PoolingRequest(Task.EMBED, inputs(msg.inputs, limits), model=msg.model,
                          adapter=msg.adapter, params=params,
                          truncation=truncation(msg), prompt=prompt(msg),
                          sparse=SparseOptions(msg.sparse_top_k, msg.return_tokens),
                          embedding_types=embedding_types(msg.embedding_types), **when)


def embedding_types(values) -> frozenset[EmbeddingType]:
    out = set()
    for value in values:
        if value not in _EMBEDDING_TYPES:
            raise InvalidInputError(f"embedding_types {value} is not an EmbeddingType (DENSE, "
                                    "SPARSE, MULTI_VECTOR)")
        out.add(_EMBEDDING_TYPES[value])
    return frozenset(out)


def hybrid(msg) -> HybridWeights | None:
    if not msg.HasField("hybrid_weights"):
        return None
    w = msg.hybrid_weights
    return HybridWeights(dense=w.dense, sparse=w.sparse, multi_vector=w.multi_vector)


def classify_request(msg: classify_pb2.ClassifyRequest, when: When,
                     limits: Limits) -> PoolingRequest:
    params = PoolingParams(activation=_optional(msg, "activation"),
                           out_dtype=output_dtype(msg.output_dtype))
    return PoolingRequest(Task.CLASSIFY, inputs(msg.inputs, limits), model=msg.model,
                          adapter=msg.adapter, params=params, truncation=truncation(msg),
                          prompt=prompt(msg), **when)


def score_request(msg: score_pb2.ScoreRequest, when: When, limits: Limits) -> PoolingRequest:
    return PoolingRequest(Task.SCORE, inputs(msg.queries, limits, "query"),
                          inputs(msg.documents, limits, "document"), model=msg.model,
                          adapter=msg.adapter,
                          params=PoolingParams(activation=_optional(msg, "activation")),
                          truncation=truncation(msg), hybrid=hybrid(msg), **when)


def rerank_request(msg: score_pb2.RerankRequest, when: When, limits: Limits) -> PoolingRequest:
    if not msg.HasField("query"):
        raise InvalidInputError("rerank needs a query")
    if not msg.documents:
        raise InvalidInputError("rerank needs at least one document")
    return PoolingRequest(Task.SCORE, inputs([msg.query], limits, "query"),
                          inputs(msg.documents, limits, "document"), model=msg.model,
                          adapter=msg.adapter,
                          params=PoolingParams(activation=_optional(msg, "activation")),
                          truncation=truncation(msg), hybrid=hybrid(msg), **when)


def encode_request(msg: encode_pb2.EncodeRequest, when: When, limits: Limits,
                   default_task: Task) -> PoolingRequest:
    """`default_task`: what the model runs for a request that names no task."""
    task = _task(msg.task) or default_task
    if task is Task.SCORE:
        raise InvalidInputError("Encode does not run score: use Score or Rerank")
    params = PoolingParams(normalize=_optional(msg, "normalize"),
                           activation=_optional(msg, "activation"),
                           out_dtype=output_dtype(msg.output_dtype))
    if msg.input_role not in _ROLES:
        raise InvalidInputError(f"input_role {msg.input_role} is not an InputRole")
    return PoolingRequest(task, inputs(msg.inputs, limits), model=msg.model,
                          adapter=msg.adapter, params=params, truncation=truncation(msg),
                          prompt=prompt(msg), raw=True,
                          offsets=msg.return_offsets, role=_ROLES[msg.input_role], **when)


def _task(value: int) -> Task | None:
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


def embed_response(out: EmbedOutput | SparseEmbedOutput | MultiEmbedOutput
                   ) -> embed_pb2.EmbedResponse:
    if out.is_multi:  # several embeddings (BGE-M3)
        response = embed_pb2.EmbedResponse(model=out.model, usage=usage(out.prompt_lens),
                                           timing=timing(out.timing))
        if out.dense is not None:
            response.embeddings.CopyFrom(tensor(out.dense, OutputDType.FLOAT32))
        if out.sparse is not None:
            response.sparse_embeddings.extend(sparse_embedding(v) for v in out.sparse)
            response.sparse_dimensions = out.vocab_size
        if out.multi_vector is not None:
            response.multi_vector_embeddings.extend(tensor(a, OutputDType.FLOAT32)
                                                    for a in out.multi_vector)
        return response
    if out.is_sparse:
        return embed_pb2.EmbedResponse(
            model=out.model, sparse_embeddings=[sparse_embedding(v) for v in out.vectors],
            sparse_dimensions=out.vocab_size, usage=usage(out.prompt_lens),
            timing=timing(out.timing))
    return embed_pb2.EmbedResponse(model=out.model, embeddings=tensor(out.embeddings, out.dtype),
                                   usage=usage(out.prompt_lens), timing=timing(out.timing))


def sparse_embedding(vector: SparseVector) -> embed_pb2.SparseEmbedding:
    return embed_pb2.SparseEmbedding(token_ids=vector.token_ids.astype("<i4").tobytes(),
                                     weights=vector.weights.astype("<f4").tobytes(),
                                     tokens=vector.tokens or ())


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
    spans = [encode_pb2.TokenSpans(offsets=[model_pb2.TokenOffset(start=a, end=b)
                                            for a, b in row]) for row in out.offsets or ()]
    return encode_pb2.EncodeResponse(model=out.model, task=wire_task(out.task),
                                     outputs=[tensor(a, out.dtype) for a in out.outputs],
                                     usage=usage(out.prompt_lens), timing=timing(out.timing),
                                     labels=out.labels, offsets=spans)
