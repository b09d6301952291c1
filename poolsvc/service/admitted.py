"""The one path a model call takes from arrival to the engine's answer, for every front (the gRPC
servicers, the HTTP routes): admitted on the event loop before any work is done on it; then, in
the worker pool, prepared (decoded, converted to the engine's PoolingRequest) and submitted,
which tokenizes it; the loop only awaits the answer. A small call (a few short texts) is prepared
on the loop itself: that takes tens of microseconds, less than the hop to the pool and back. A
caller that leaves cancels the work, even while the request is still being prepared."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import traceback
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the engine pulls in torch; the service layer needs only its types
    from poolsvc.engine.admission import Ticket
    from poolsvc.engine.engine import Engine
    from poolsvc.engine.request import PoolingRequest

# Prepares a call in the pool: returns what the answer needs of the message (anything) and the
# engine request.
Prepare = Callable[[], "tuple[Any, PoolingRequest]"]

# Calls of at most this many bytes are prepared on the event loop. A 40-character query
# tokenizes in ~20 us and 500 characters in ~125 us (MiniLM's WordPiece), about what the pool's
# hop costs (a future, a worker's wake-up, the loop's wake-up to take the result); a bigger call
# would hold the loop longer than the hop saves. Measured on 2 cores (docs/benchmarks.md): one
# short text served idle, p50 0.91x; one-text requests, 64 in flight, 1.10x the throughput.
INLINE_BYTES = 512


async def run(engine: Engine, pool: Executor, deadline_ns: int | None,
              prepare: Prepare, size: int | None = None) -> tuple[Any, Any]:
    """Admits the call (OverloadedError at once if the server is full), prepares and submits it
    (in `pool`, unless its `size` in bytes is at most INLINE_BYTES); returns what `prepare` kept
    and the engine's output."""
    ticket = engine.admit(deadline_ns)
    if size is not None and size <= INLINE_BYTES:
        kept, future = _submit(engine, prepare, ticket)
        return kept, await asyncio.wrap_future(future)
    submitted = pool.submit(_submit, engine, prepare, ticket)
    try:
        kept, future = await asyncio.wrap_future(submitted)
    except asyncio.CancelledError:
        submitted.add_done_callback(functools.partial(_abandon, engine, ticket))
        raise
    return kept, await asyncio.wrap_future(future)


def _submit(engine: Engine, prepare: Prepare, ticket: Ticket):
    try:
        kept, request = prepare()
        return kept, engine.submit(request, ticket)
    except BaseException as exc:
        engine.release(ticket)
        # An error can outlive its call (gRPC holds on to it a while): free the request its
        # frames refer to now, not when the error goes.
        traceback.clear_frames(exc.__traceback__)
        raise


def _abandon(engine: Engine, ticket: Ticket, submitted: concurrent.futures.Future) -> None:
    """The caller left while its request was in the pool: cancel what it produced."""
    if submitted.cancelled():  # never started
        engine.release(ticket)
    elif submitted.exception() is None:
        submitted.result()[1].cancel()
