"""Bidirectional streams: many requests on one call, answered concurrently, with bounded work
and bounded memory whatever the client does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from poolsvc.engine.errors import InvalidInputError
from poolsvc.gen.v1 import common_pb2
from poolsvc.service.handlers import stream_item_id
from poolsvc.service.status import status_of

_FINISHED = object()


async def serve_stream(requests: AsyncIterator[bytes],
                       handle: Callable[[bytes], Awaitable[object]], respond: Callable,
                       limit: int, record: Callable[[str, float, object], None]
                       ) -> AsyncIterator:
    """Runs every item (raw bytes) of a bidirectional stream concurrently and yields responses
    as they finish.

    At most `limit` items are in flight, counting both those being computed and answers computed
    but not yet sent: past it the stream is not read, so gRPC flow control pushes back on a
    client that sends faster than it reads. An item that fails (bad input, one that cannot even
    be decoded, over the limits) gets an error response carrying its id, and the stream goes on.
    If the stream itself cannot be read further, the answers already computed are sent, then the
    stream ends with INVALID_ARGUMENT. `record(code, seconds, response or None)` is told of each
    item's outcome."""
    done: asyncio.Queue = asyncio.Queue()
    slots = asyncio.Semaphore(limit)
    tasks: set[asyncio.Task] = set()
    read_error: list[BaseException] = []

    async def one(raw: bytes) -> None:
        started = time.perf_counter()
        try:
            result = await handle(raw)
            response = respond(id=stream_item_id(raw), response=result)
            record("OK", time.perf_counter() - started, result)
        except Exception as exc:
            code, message = status_of(exc)
            error = common_pb2.StreamError(code=code.value[0], message=message)
            response = respond(id=stream_item_id(raw), error=error)
            record(code.name, time.perf_counter() - started, None)
        await done.put(response)

    async def read() -> None:
        try:
            async for raw in requests:
                await slots.acquire()
                task = asyncio.create_task(one(raw))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except Exception as exc:  # the transport: answer what was read, then end the stream
            read_error.append(exc)
        await asyncio.gather(*tasks, return_exceptions=True)
        await done.put(_FINISHED)

    reader = asyncio.create_task(read())
    try:
        while (response := await done.get()) is not _FINISHED:
            yield response
            slots.release()  # sent: the next item may be read
        if read_error:
            raise InvalidInputError(f"the stream could not be read further: {read_error[0]}")
    finally:
        pending = [reader, *tasks]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
