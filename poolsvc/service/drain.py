"""The drain on shutdown: which model calls are in flight, refusing new ones, and cutting off the
rest when the grace period ends, each with UNAVAILABLE and a message that says why.

Health and reflection are not model calls: they pass untouched, so probes keep getting answers
(NOT_SERVING) for as long as the port is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect

import grpc

MODEL_CALLS = "/poolsvc.v1."

REFUSED = ("poolsvc is shutting down and takes no new calls (health is NOT_SERVING); retry on "
           "another replica")


def cut_off_message(grace_period: float) -> str:
    return (f"poolsvc shut down before this call finished: the server's --grace-period of "
            f"{grace_period:g}s ran out; retry on another replica")


def refusal_after_cut_off(grace_period: float) -> str:
    return (f"poolsvc is shutting down and takes no new calls; calls still running when its "
            f"--grace-period of {grace_period:g}s ran out were cut off; retry on another replica")


class Drain(grpc.aio.ServerInterceptor):
    """Tracks model calls (one asyncio task each). `drain()` refuses new ones, waits for those
    in flight up to the grace period, then cuts off the rest."""

    def __init__(self):
        self.draining = False
        self._calls: set[asyncio.Task] = set()  # in flight: the drain waits for these
        self._idle = asyncio.Event()
        self._cut_off: str | None = None  # the message, once calls are being cut off
        self._refusal = REFUSED

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(MODEL_CALLS):
            return handler
        return _tracked(handler, self)

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    async def drain(self, grace_period: float) -> int:
        """Refuses new model calls from now on; gives those in flight `grace_period` seconds,
        then cuts them off. Returns how many were cut off."""
        self.draining = True
        if self._calls:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), grace_period)
            except asyncio.TimeoutError:
                pass
        return await self.cut_off(cut_off_message(grace_period),
                                  refusal_after_cut_off(grace_period))

    async def cut_off(self, message: str, refusal: str = REFUSED, wait: float = 1.0) -> int:
        """Ends every model call in flight with UNAVAILABLE `message` (waiting up to `wait`
        seconds for them to send it), and refuses later ones with `refusal`: a cut-off call
        retried by its client (the documented service config retries UNAVAILABLE) lands there.
        Returns how many were cut off."""
        self.draining = True
        self._cut_off = message
        if self._calls:
            self._refusal = refusal
        calls = list(self._calls)
        for task in calls:
            task.cancel()
        if calls:
            await asyncio.wait(calls, timeout=wait)
        return len(calls)

    async def _refuse(self, context: grpc.aio.ServicerContext, requests=None) -> None:
        """UNAVAILABLE with the reason. A stream's requests are read to their end first: grpc's
        asyncio client reports a status that arrives while it is still writing as "Internal error
        from Core" or CANCELLED. (A stream whose requests never end is cancelled when the port
        closes.)"""
        if requests is not None:
            async for _ in requests:
                pass
        await context.abort(grpc.StatusCode.UNAVAILABLE, self._refusal)

    @property
    def refusal(self) -> str:
        """What a model call arriving now is told (while draining)."""
        return self._refusal

    @property
    def cut_off_reason(self) -> str | None:
        """Once calls are being cut off, what each is told; None before."""
        return self._cut_off

    @contextlib.contextmanager
    def tracked(self):
        """A model call of another front (the HTTP routes) in flight in the current task: the
        drain waits for it, and cancels the task to cut it off."""
        task = self._enter()
        try:
            yield task
        finally:
            self._leave(task)

    def _enter(self) -> asyncio.Task:
        task = asyncio.current_task()
        self._calls.add(task)
        return task

    def _leave(self, task: asyncio.Task) -> None:
        self._calls.discard(task)
        if not self._calls:
            self._idle.set()

    async def _abort_cut_off(self, context: grpc.aio.ServicerContext) -> None:
        """Sends the cut-off status from the call's own (cancelled) task."""
        task = asyncio.current_task()
        if hasattr(task, "uncancel"):  # Python 3.11+: the task goes on after the cancel
            task.uncancel()
        await context.abort(grpc.StatusCode.UNAVAILABLE, self._cut_off)


def _tracked(handler: grpc.RpcMethodHandler, drain: Drain) -> grpc.RpcMethodHandler:
    """The same handler, refused while draining and tracked while it runs."""
    if handler.unary_unary:
        behavior, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    elif handler.unary_stream:
        behavior, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    elif handler.stream_unary:
        behavior, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    else:
        behavior, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    streaming_requests = handler.request_streaming

    async def call(request, context):
        if drain.draining:
            await drain._refuse(context, request if streaming_requests else None)
        task = drain._enter()
        try:
            return await behavior(request, context)
        except asyncio.CancelledError:
            if drain._cut_off is None:  # the client's own cancel, or its deadline
                raise
            await drain._abort_cut_off(context)
        finally:
            drain._leave(task)

    async def stream(request, context):
        if drain.draining:
            await drain._refuse(context, request if streaming_requests else None)
        task = drain._enter()
        try:
            async for response in behavior(request, context):
                yield response
        except asyncio.CancelledError:
            if drain._cut_off is None:  # the client's own cancel, or its deadline
                raise
            await drain._abort_cut_off(context)
        finally:
            drain._leave(task)

    return make(stream if inspect.isasyncgenfunction(behavior) else call,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
