"""The gRPC servicers: decode a request, hand it to the engine off the event loop, encode."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor

import grpc

from poolsvc.engine.engine import Engine
from poolsvc.engine.params import PoolingType, Task
from poolsvc.engine.request import now_ns
from poolsvc.engine.served import ServedModel
from poolsvc.gen.v1 import (
    classify_pb2_grpc,
    common_pb2,
    embed_pb2,
    embed_pb2_grpc,
    encode_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
    score_pb2_grpc,
)
from poolsvc.service import convert
from poolsvc.service.status import status_of

log = logging.getLogger(__name__)

_TASKS = {Task.EMBED: common_pb2.TASK_EMBED, Task.CLASSIFY: common_pb2.TASK_CLASSIFY,
          Task.SCORE: common_pb2.TASK_SCORE, Task.REWARD: common_pb2.TASK_REWARD,
          Task.TOKEN_EMBED: common_pb2.TASK_TOKEN_EMBED,
          Task.TOKEN_CLASSIFY: common_pb2.TASK_TOKEN_CLASSIFY}
_POOLING = {p: common_pb2.PoolingType.Value(f"POOLING_TYPE_{p.name}") for p in PoolingType}


def unary(method):
    """Maps errors raised by a unary handler to statuses through the one table."""

    @functools.wraps(method)
    async def handler(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except Exception as exc:
            code, message = status_of(exc)
            await context.abort(code, message)

    return handler


async def serve_stream(requests: AsyncIterator, handle: Callable[[object], Awaitable[object]],
                       respond: Callable, limit: int) -> AsyncIterator:
    """Runs every request of a bidirectional stream concurrently and yields responses as they
    finish. At most `limit` are in flight: past that the stream is not read, so gRPC flow control
    pushes back on the client. A failed request yields an error response; the stream goes on."""
    done: asyncio.Queue = asyncio.Queue()
    slots = asyncio.Semaphore(limit)
    tasks: set[asyncio.Task] = set()
    finished = object()

    async def one(item):
        try:
            response = respond(id=item.id, response=await handle(item.request))
        except Exception as exc:
            code, message = status_of(exc)
            error = common_pb2.StreamError(code=code.value[0], message=message)
            response = respond(id=item.id, error=error)
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


class EmbedServicer(embed_pb2_grpc.EmbedServiceServicer):
    def __init__(self, engine: Engine, pool: Executor, stream_limit: int):
        self.engine, self.pool, self.stream_limit = engine, pool, stream_limit

    async def _embed(self, request: embed_pb2.EmbedRequest) -> embed_pb2.EmbedResponse:
        arrival = now_ns()
        call = functools.partial(
            self.engine.embed, request.model, convert.inputs(request.inputs),
            convert.embed_params(request), convert.truncation(request), convert.prompt(request),
            arrival)
        future = await asyncio.get_running_loop().run_in_executor(self.pool, call)
        return convert.embed_response(await asyncio.wrap_future(future))

    @unary
    async def Embed(self, request, context):
        return await self._embed(request)

    async def EmbedStream(self, request_iterator, context):
        async for response in serve_stream(request_iterator, self._embed,
                                           embed_pb2.EmbedStreamResponse, self.stream_limit):
            yield response


class ModelServicer(model_pb2_grpc.ModelServiceServicer):
    def __init__(self, engine: Engine, pool: Executor):
        self.engine, self.pool = engine, pool

    @unary
    async def ListModels(self, request, context):
        return model_pb2.ListModelsResponse(models=[model_info(m) for m in self.engine.models()])

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


def model_info(model: ServedModel) -> model_pb2.ModelInfo:
    files = model.files
    return model_pb2.ModelInfo(
        name=model.name, aliases=model.aliases, source=files.source, is_default=model.is_default,
        tasks=[_TASKS[t] for t in model.tasks], default_task=_TASKS[model.tasks[0]],
        dimensions=model.hidden_size, matryoshka_dimensions=files.matryoshka_dimensions,
        max_input_tokens=model.max_input_tokens, vocab_size=model.vocab_size,
        compute_dtype=str(model.dtype).removeprefix("torch."), device=str(model.device),
        pooling_type=_POOLING[model.pooling_type], normalize_default=files.normalize,
        prompts=files.prompts, default_prompt_name=files.default_prompt_name or "",
        modalities=[common_pb2.MODALITY_TEXT], architecture=files.architecture,
        implementation="poolsvc")


def _not_yet(rpc: str, what: str):
    message = (f"{rpc} is not available in this poolsvc version: {what} has not landed yet. "
               "Embed, EmbedStream, Tokenize, ListModels and GetModelInfo work.")

    async def handler(self, request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    return handler


_SCORING = "sentence-pair scoring (cross-encoders and bi-encoder cosine)"


class ClassifyServicer(classify_pb2_grpc.ClassifyServiceServicer):
    Classify = _not_yet("Classify", "sequence classification")
    ClassifyStream = _not_yet("ClassifyStream", "sequence classification")


class ScoreServicer(score_pb2_grpc.ScoreServiceServicer):
    Score = _not_yet("Score", _SCORING)
    ScoreStream = _not_yet("ScoreStream", _SCORING)
    Rerank = _not_yet("Rerank", _SCORING)


class EncodeServicer(encode_pb2_grpc.EncodeServiceServicer):
    Encode = _not_yet("Encode", "per-token pooling (token_embed, token_classify, reward)")
    EncodeStream = _not_yet("EncodeStream", "per-token pooling (token_embed, token_classify, "
                            "reward)")
