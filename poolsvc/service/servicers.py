"""The gRPC servicers. Each call is admitted on the event loop before anything is done with it;
then, in the worker pool, its bytes are decoded, converted to the engine's PoolingRequest and
tokenized; the loop only awaits the engine's answer and encodes the response."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import traceback
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from poolsvc.engine.description import ModelDescription
from poolsvc.engine.params import PoolingType
from poolsvc.engine.request import now_ns
from poolsvc.gen.v1 import classify_pb2, common_pb2, embed_pb2, encode_pb2, model_pb2, score_pb2
from poolsvc.service import admitted, convert
from poolsvc.service.handlers import check_size, decode
from poolsvc.service.observability import Metrics, rpc_span
from poolsvc.service.status import status_of
from poolsvc.service.streams import serve_stream

if TYPE_CHECKING:  # the engine pulls in torch; the service layer needs only its types
    from poolsvc.engine.engine import Engine

log = logging.getLogger(__name__)

_POOLING = {p: common_pb2.PoolingType.Value(f"POOLING_TYPE_{p.name}") for p in PoolingType}


def unary(method):
    """The envelope of a unary RPC: a trace span, errors mapped to statuses through the one
    table, the response's timing in trailing metadata, and the RPC's metrics."""

    @functools.wraps(method)
    async def handler(self, raw: bytes, context: grpc.aio.ServicerContext):
        rpc = f"{self.SERVICE}/{method.__name__}"
        started, code = time.perf_counter(), "OK"
        with rpc_span(rpc, context.invocation_metadata()):
            try:
                response = await method(self, raw, context)
                if "timing" in response.DESCRIPTOR.fields_by_name and response.HasField("timing"):
                    self.metrics.on_timing(response.timing)
                    context.set_trailing_metadata(_timing_metadata(response.timing))
                return response
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as exc:
                status, message = status_of(exc)
                code = status.name
                await context.abort(status, message)
            finally:
                self.metrics.on_rpc(rpc, code, time.perf_counter() - started)

    return handler


def _timing_metadata(timing) -> tuple[tuple[str, str], ...]:
    return tuple((f"poolsvc-{name.replace('_', '-')}", str(getattr(timing, name)))
                 for name in ("queue_ns", "tokenization_ns", "inference_ns", "total_ns"))


def _when(context: grpc.aio.ServicerContext) -> convert.When:
    """The call's arrival, and its deadline if the client set one (work still queued when it
    passes is dropped, not computed)."""
    arrival = now_ns()
    remaining = context.time_remaining()
    return convert.When(arrival_ns=arrival, deadline_ns=None if remaining is None
                        else arrival + int(remaining * 1e9))


class _Servicer:
    SERVICE = ""

    def __init__(self, engine: Engine, pool: Executor, metrics: Metrics, *,
                 stream_limit: int, max_message_bytes: int):
        self.engine, self.pool, self.metrics = engine, pool, metrics
        self.stream_limit, self.max_message_bytes = stream_limit, max_message_bytes

    async def _in_pool(self, work: Callable, raw: bytes):
        return await asyncio.get_running_loop().run_in_executor(self.pool, _detached, work, raw)

    async def _run(self, raw: bytes, message_type, to_request: Callable, context):
        """Admits the call, then decodes, converts and submits it in the pool (admitted.run);
        returns the decoded message and the engine's output."""
        when = _when(context)
        check_size(raw, self.max_message_bytes)

        def prepare():
            message = decode(raw, message_type, self.max_message_bytes)
            return message, to_request(message, when)

        return await admitted.run(self.engine, self.pool, when["deadline_ns"], prepare, len(raw))

    def _stream(self, method: str, requests: AsyncIterator[bytes], context, handle,
                response_type) -> AsyncIterator:
        rpc = f"{self.SERVICE}/{method}"

        def record(code: str, seconds: float, response) -> None:
            self.metrics.on_rpc(rpc, code, seconds)
            if response is not None:
                self.metrics.on_timing(response.timing)

        return serve_stream(requests, functools.partial(handle, context=context), response_type,
                            self.stream_limit, record)

    async def _answer_stream(self, method: str, requests, context, handle, response_type):
        """Yields a stream's answers; if the stream itself fails, its status (the answers
        already computed have been sent)."""
        try:
            async for response in self._stream(method, requests, context, handle, response_type):
                yield response
        except Exception as exc:
            await context.abort(*status_of(exc))


@dataclass(frozen=True)
class TaskRpc:
    """A task's unary RPC and its stream: their messages, and the two conversions
    (`to_request(message, when, engine)`, `respond(output)`)."""

    request: type
    stream_request: type
    stream_response: type
    to_request: Callable
    respond: Callable


class _TaskServicer(_Servicer):
    async def _answer(self, rpc: TaskRpc, raw: bytes, context, *, item: bool = False):
        """One request (or one stream item's request) through the engine, answered."""
        def to_request(message, when):
            return rpc.to_request(message.request if item else message, when, self.engine)

        message_type = rpc.stream_request if item else rpc.request
        _, out = await self._run(raw, message_type, to_request, context)
        return rpc.respond(out)

    async def _answers(self, rpc: TaskRpc, method: str, requests, context):
        handle = functools.partial(self._answer, rpc, item=True)
        async for response in self._answer_stream(method, requests, context, handle,
                                                  rpc.stream_response):
            yield response


def _encode_request(message, when, engine):
    default_task = engine.model(message.model).default_task  # the task when none is named
    return convert.encode_request(message, when, engine.limits, default_task)


EMBED = TaskRpc(embed_pb2.EmbedRequest, embed_pb2.EmbedStreamRequest,
                embed_pb2.EmbedStreamResponse,
                lambda message, when, engine: convert.embed_request(message, when, engine.limits),
                convert.embed_response)
CLASSIFY = TaskRpc(classify_pb2.ClassifyRequest, classify_pb2.ClassifyStreamRequest,
                   classify_pb2.ClassifyStreamResponse,
                   lambda message, when, engine: convert.classify_request(message, when,
                                                                          engine.limits),
                   convert.classify_response)
SCORE = TaskRpc(score_pb2.ScoreRequest, score_pb2.ScoreStreamRequest,
                score_pb2.ScoreStreamResponse,
                lambda message, when, engine: convert.score_request(message, when, engine.limits),
                convert.score_response)
ENCODE = TaskRpc(encode_pb2.EncodeRequest, encode_pb2.EncodeStreamRequest,
                 encode_pb2.EncodeStreamResponse, _encode_request, convert.encode_response)


class EmbedServicer(_TaskServicer):
    SERVICE = "poolsvc.v1.EmbedService"

    @unary
    async def Embed(self, raw, context):
        return await self._answer(EMBED, raw, context)

    async def EmbedStream(self, requests, context):
        async for response in self._answers(EMBED, "EmbedStream", requests, context):
            yield response


class ClassifyServicer(_TaskServicer):
    SERVICE = "poolsvc.v1.ClassifyService"

    @unary
    async def Classify(self, raw, context):
        return await self._answer(CLASSIFY, raw, context)

    async def ClassifyStream(self, requests, context):
        async for response in self._answers(CLASSIFY, "ClassifyStream", requests, context):
            yield response


class ScoreServicer(_TaskServicer):
    SERVICE = "poolsvc.v1.ScoreService"

    @unary
    async def Score(self, raw, context):
        return await self._answer(SCORE, raw, context)

    async def ScoreStream(self, requests, context):
        async for response in self._answers(SCORE, "ScoreStream", requests, context):
            yield response

    @unary
    async def Rerank(self, raw, context):
        def to_request(message, when):
            return convert.rerank_request(message, when, self.engine.limits)

        request, out = await self._run(raw, score_pb2.RerankRequest, to_request, context)
        return convert.rerank_response(out, request.documents, request.top_n,
                                       request.return_documents)


class EncodeServicer(_TaskServicer):
    SERVICE = "poolsvc.v1.EncodeService"

    @unary
    async def Encode(self, raw, context):
        return await self._answer(ENCODE, raw, context)

    async def EncodeStream(self, requests, context):
        async for response in self._answers(ENCODE, "EncodeStream", requests, context):
            yield response


def _detached(work: Callable, raw: bytes):
    """work(raw), whose errors keep no request alive (see _Servicer._submit)."""
    try:
        return work(raw)
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)
        del raw
        raise


class ModelServicer(_Servicer):
    SERVICE = "poolsvc.v1.ModelService"

    @unary
    async def ListModels(self, raw, context):
        await self._in_pool(self._decoder(model_pb2.ListModelsRequest), raw)
        return model_pb2.ListModelsResponse(models=[model_info(m) for m in self.engine.describe()])

    @unary
    async def GetModelInfo(self, raw, context):
        request = await self._in_pool(self._decoder(model_pb2.GetModelInfoRequest), raw)
        return model_pb2.GetModelInfoResponse(info=model_info(self.engine.model(request.model)))

    @unary
    async def Tokenize(self, raw, context):
        check_size(raw, self.max_message_bytes)
        ticket = self.engine.admit()
        try:
            return await self._in_pool(self._tokenize, raw)
        finally:
            self.engine.release(ticket)

    def _decoder(self, message_type) -> Callable[[bytes], object]:
        return functools.partial(decode, message_type=message_type,
                                 max_bytes=self.max_message_bytes)

    def _tokenize(self, raw: bytes) -> model_pb2.TokenizeResponse:
        request = decode(raw, model_pb2.TokenizeRequest, self.max_message_bytes)
        model, encodings = self.engine.tokenize(
            request.model, list(request.texts), convert.truncation(request),
            convert.prompt(request),
            request.add_special_tokens if request.HasField("add_special_tokens") else True,
            request.return_offsets or request.return_tokens)  # the slow path fills tokens
        results = []
        for enc in encodings:
            item = model_pb2.TokenizedText(ids=enc.ids)
            if request.return_tokens:
                item.tokens.extend(enc.tokens)
            if request.return_offsets:
                item.offsets.extend(model_pb2.TokenOffset(start=a, end=b) for a, b in enc.offsets)
            results.append(item)
        return model_pb2.TokenizeResponse(model=model.name, results=results,
                                          max_input_tokens=model.max_input_tokens)


def model_info(model: ModelDescription) -> model_pb2.ModelInfo:
    return model_pb2.ModelInfo(
        name=model.name, aliases=model.aliases, source=model.source, is_default=model.is_default,
        tasks=[convert.wire_task(t) for t in model.tasks],
        default_task=convert.wire_task(model.default_task), dimensions=model.embed_dimensions,
        matryoshka_dimensions=model.matryoshka_dimensions,
        max_input_tokens=model.max_input_tokens, vocab_size=model.vocab_size,
        compute_dtype=model.compute_dtype, device=model.device,
        pooling_type=_POOLING[model.pooling_type], normalize_default=model.normalize_default,
        prompts=model.prompts, default_prompt_name=model.default_prompt_name or "",
        labels=model.labels,
        modalities=[common_pb2.Modality.Value(f"MODALITY_{m.upper()}") for m in model.modalities],
        architecture=model.architecture, implementation=model.implementation,
        adapters=[model_pb2.AdapterInfo(name=a.name, source=a.source, rank=a.rank,
                                        target_modules=a.target_modules)
                  for a in model.adapters])


# Every poolsvc servicer, by the name of the service it implements.
SERVICERS: dict[str, type[_Servicer]] = {
    cls.SERVICE: cls for cls in (EmbedServicer, ClassifyServicer, ScoreServicer, EncodeServicer,
                                 ModelServicer)}
