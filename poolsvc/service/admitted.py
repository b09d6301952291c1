"""The one path a model call takes from arrival to the engine's answer, for every front (the gRPC
servicers, the HTTP routes): admitted on the event loop before any work is done on it; then, in
the worker pool, prepared (decoded, converted to the engine's PoolingRequest) and submitted,
which tokenizes it; the loop only awaits the answer. A caller that leaves cancels the work, even
while the request is still being prepared."""

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


async def run(engine: Engine, pool: Executor, deadline_ns: int | None,
              prepare: Prepare) -> tuple[Any, Any]:
    """Admits the call (OverloadedError at once if the server is full), prepares and submits it
    in `pool`; returns what `prepare` kept and the engine's output."""
    ticket = engine.admit(deadline_ns)
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
