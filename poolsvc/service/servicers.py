"""The gRPC servicers: decode a request, hand it to the engine off the event loop, encode."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING

import grpc

from poolsvc.engine.description import ModelDescription
from poolsvc.engine.params import PoolingType
from poolsvc.engine.request import PoolingRequest, now_ns
from poolsvc.gen.v1 import (
    classify_pb2,
    classify_pb2_grpc,
    common_pb2,
    embed_pb2,
    embed_pb2_grpc,
    encode_pb2,
    encode_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
    score_pb2,
    score_pb2_grpc,
)
from poolsvc.service import convert
from poolsvc.service.observability import Metrics, rpc_span
from poolsvc.service.status import status_of

if TYPE_CHECKING:  # the engine pulls in torch; the service layer needs only its type
    from poolsvc.engine.engine import Engine

log = logging.getLogger(__name__)

_POOLING = {p: common_pb2.PoolingType.Value(f"POOLING_TYPE_{p.name}") for p in PoolingType}


def unary(method):
    """The envelope of a unary RPC: a trace span, errors mapped to statuses through the one
    table, the response's timing in trailing metadata, and the RPC's metrics."""

    @functools.wraps(method)
    async def handler(self, request, context: grpc.aio.ServicerContext):
        rpc = f"{self.SERVICE}/{method.__name__}"
        started, code = time.perf_counter(), "OK"
        with rpc_span(rpc, context.invocation_metadata()):
            try:
                response = await method(self, request, context)
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


async def serve_stream(requests: AsyncIterator, handle: Callable[[object], Awaitable[object]],
                       respond: Callable, limit: int,
                       record: Callable[[str, float, object], None]) -> AsyncIterator:
    """Runs every request of a bidirectional stream concurrently and yields responses as they
    finish. At most `limit` are in flight: past that the stream is not read, so gRPC flow control
    pushes back on the client. A failed request yields an error response; the stream goes on.
    `record(code, seconds, response or None)` is told of each request's outcome."""
    done: asyncio.Queue = asyncio.Queue()
    slots = asyncio.Semaphore(limit)
    tasks: set[asyncio.Task] = set()
    finished = object()

    async def one(item):
        started = time.perf_counter()
        try:
            result = await handle(item.request)
            response = respond(id=item.id, response=result)
            record("OK", time.perf_counter() - started, result)
        except Exception as exc:
            code, message = status_of(exc)
            error = common_pb2.StreamError(code=code.value[0], message=message)
            response = respond(id=item.id, error=error)
            record(code.name, time.perf_counter() - started, None)
        slots.release()
        await done.put(response)

    async def read():
        async for item in requests:
            await slots.acquire()
            task = asyncio.create_task(one(item))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.gather(*tasks)
        await done.put(finished)

    reader = asyncio.create_task(read())
    try:
        while True:
            getter = asyncio.ensure_future(done.get())
            await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():  # the reader failed before finishing: re-raise its error
                getter.cancel()
                reader.result()
                continue
            response = getter.result()
            if response is finished:
                return
            yield response
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()


def _when(context: grpc.aio.ServicerContext) -> convert.When:
    """The call's arrival, and its deadline if the client set one (work still queued when it
    passes is dropped, not computed)."""
    arrival = now_ns()
    remaining = context.time_remaining()
    return convert.When(arrival_ns=arrival, deadline_ns=None if remaining is None
                        else arrival + int(remaining * 1e9))


class _EngineServicer:
    SERVICE = ""

    def __init__(self, engine: Engine, pool: Executor, stream_limit: int, metrics: Metrics):
        self.engine, self.pool, self.stream_limit = engine, pool, stream_limit
        self.metrics = metrics

    def _stream(self, method: str, requests, context, handle, response_type) -> AsyncIterator:
        rpc = f"{self.SERVICE}/{method}"

        def record(code: str, seconds: float, response) -> None:
            self.metrics.on_rpc(rpc, code, seconds)
            if response is not None:
                self.metrics.on_timing(response.timing)

        return serve_stream(requests, functools.partial(handle, context=context), response_type,
                            self.stream_limit, record)

    async def _submit(self, request: PoolingRequest):
        """Tokenizes in the pool (off the event loop), then awaits the engine's output. A caller
        that leaves (cancels, or its deadline passes) cancels the engine's work, even when it
        leaves while the request is still being tokenized and admitted."""
        submitted = self.pool.submit(self.engine.submit, request)
        try:
            future = await asyncio.wrap_future(submitted)
        except asyncio.CancelledError:
            submitted.add_done_callback(_cancel_admitted)
            raise
        return await asyncio.wrap_future(future)


def _cancel_admitted(submitted: concurrent.futures.Future) -> None:
    """Cancels the engine future a cancelled caller's submit produced, if it produced one."""
    if not submitted.cancelled() and submitted.exception() is None:
        submitted.result().cancel()


class EmbedServicer(_EngineServicer, embed_pb2_grpc.EmbedServiceServicer):
    SERVICE = "poolsvc.v1.EmbedService"

    async def _embed(self, request: embed_pb2.EmbedRequest, context) -> embed_pb2.EmbedResponse:
        out = await self._submit(convert.embed_request(request, _when(context)))
        return convert.embed_response(out)

    @unary
    async def Embed(self, request, context):
        return await self._embed(request, context)

    async def EmbedStream(self, request_iterator, context):
        async for response in self._stream("EmbedStream", request_iterator, context,
                                           self._embed,
                                           embed_pb2.EmbedStreamResponse):
            yield response


class ClassifyServicer(_EngineServicer, classify_pb2_grpc.ClassifyServiceServicer):
    SERVICE = "poolsvc.v1.ClassifyService"

    async def _classify(self, request: classify_pb2.ClassifyRequest, context):
        out = await self._submit(convert.classify_request(request, _when(context)))
        return convert.classify_response(out)

    @unary
    async def Classify(self, request, context):
        return await self._classify(request, context)

    async def ClassifyStream(self, request_iterator, context):
        async for response in self._stream("ClassifyStream", request_iterator, context,
                                           self._classify,
                                           classify_pb2.ClassifyStreamResponse):
            yield response


class ScoreServicer(_EngineServicer, score_pb2_grpc.ScoreServiceServicer):
    SERVICE = "poolsvc.v1.ScoreService"

    async def _score(self, request: score_pb2.ScoreRequest, context):
        out = await self._submit(convert.score_request(request, _when(context)))
        return convert.score_response(out)

    @unary
    async def Score(self, request, context):
        return await self._score(request, context)

    async def ScoreStream(self, request_iterator, context):
        async for response in self._stream("ScoreStream", request_iterator, context,
                                           self._score,
                                           score_pb2.ScoreStreamResponse):
            yield response

    @unary
    async def Rerank(self, request, context):
        out = await self._submit(convert.rerank_request(request, _when(context)))
        return convert.rerank_response(out, request.documents, request.top_n,
                                       request.return_documents)


class EncodeServicer(_EngineServicer, encode_pb2_grpc.EncodeServiceServicer):
    SERVICE = "poolsvc.v1.EncodeService"

    async def _encode(self, request: encode_pb2.EncodeRequest, context):
        default_task = self.engine.model(request.model).default_task
        out = await self._submit(convert.encode_request(request, _when(context), default_task))
        return convert.encode_response(out)

    @unary
    async def Encode(self, request, context):
        return await self._encode(request, context)

    async def EncodeStream(self, request_iterator, context):
        async for response in self._stream("EncodeStream", request_iterator, context,
                                           self._encode,
                                           encode_pb2.EncodeStreamResponse):
            yield response


class ModelServicer(model_pb2_grpc.ModelServiceServicer):
    SERVICE = "poolsvc.v1.ModelService"

    def __init__(self, engine: Engine, pool: Executor, metrics: Metrics):
        self.engine, self.pool, self.metrics = engine, pool, metrics

    @unary
    async def ListModels(self, request, context):
        return model_pb2.ListModelsResponse(models=[model_info(m) for m in self.engine.describe()])

    @unary
    async def GetModelInfo(self, request, context):
        return model_pb2.GetModelInfoResponse(info=model_info(self.engine.model(request.model)))

    @unary
    async def Tokenize(self, request, context):
        call = functools.partial(
            self.engine.tokenize, request.model, list(request.texts), convert.truncation(request),
            convert.prompt(request),
            request.add_special_tokens if request.HasField("add_special_tokens") else True,
            request.return_offsets)
        model, encodings = await asyncio.get_running_loop().run_in_executor(self.pool, call)
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
        architecture=model.architecture, implementation=model.implementation)
