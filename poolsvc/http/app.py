"""The HTTP application: the peers' routes on one FastAPI app (request validation and the
OpenAPI schema, at /openapi.json and /docs, come from their request models), /health and
/metrics as the probe port serves them, and `Guard`, the ASGI layer every call passes first:
the API key, the body size, the drain, and the metrics, in that order, before the body is read."""

from __future__ import annotations

import asyncio
import hmac
import time

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from poolsvc import __version__
from poolsvc.engine.errors import EngineError
from poolsvc.http import cohere, openai, vllm
from poolsvc.http.common import Front
from poolsvc.http.errors import (
    engine_error_response,
    error_response,
    peer_of,
    validation_message,
)
from poolsvc.service.drain import Drain
from poolsvc.service.observability import Metrics

OPEN_PATHS = ("/health", "/metrics")  # probes: no API key, as on the probe port


def build_app(front: Front, metrics: Metrics, ready) -> FastAPI:
    """The routes on `front`; `ready()`: models loaded and not draining (/health)."""
    app = FastAPI(title="poolsvc", version=__version__, redoc_url=None,
                  description="OpenAI-, vLLM- and Cohere-compatible JSON routes on poolsvc's "
                  "engine, beside its gRPC services.")
    routers = [module.router(front) for module in (openai, vllm, cohere)]
    for routes in routers:
        app.include_router(routes)
    fields = {route.path: tuple(route.body_field.field_info.annotation.model_fields)
              for routes in routers for route in routes.routes if route.body_field is not None}
    app.state.paths = {route.path for routes in routers for route in routes.routes} | \
        set(OPEN_PATHS)

    @app.get("/health", tags=["probes"], summary="200 when serving, 503 while loading or draining")
    async def health():
        return Response(status_code=200 if ready() else 503)

    @app.get("/metrics", tags=["probes"], summary="Prometheus metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        path = request.url.path
        return error_response(peer_of(path), 400, validation_message(exc, fields.get(path, ())))

    @app.exception_handler(HTTPException)
    async def no_route(request: Request, exc: HTTPException):
        path = request.url.path
        if exc.status_code == 404:
            message = f"no route {request.method} {path}; the routes are listed at /openapi.json"
        elif exc.status_code == 405:
            message = f"{path} does not take {request.method}; see /openapi.json"
        else:
            message = str(exc.detail)
        return error_response(peer_of(path), exc.status_code, message)

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError):
        return engine_error_response(request.url.path, exc)

    @app.exception_handler(Exception)  # a bug: 500, logged with its traceback and an id
    async def bug(request: Request, exc: Exception):
        return engine_error_response(request.url.path, exc)

    return app


class Guard:
    """Before a call reaches the routes: the API key (401), the body size (413, from
    Content-Length at once, else as it streams in), the drain (503 while shutting down; calls
    in flight are tracked, and cut off with 503 when the grace period ends); and each call's
    metrics (`poolsvc_requests_total{rpc="POST /v1/embeddings", code="200"}`)."""

    def __init__(self, app, *, api_key: str, max_body_bytes: int, drain: Drain,
                 metrics: Metrics):
        self.app, self.drain, self.metrics = app, drain, metrics
        self.max_body_bytes = max_body_bytes
        self._expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        started, status = time.perf_counter(), [0]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, sending, path)
        finally:
            self.metrics.on_rpc(f"{scope['method']} {self._label(path)}", str(status[0]),
                                time.perf_counter() - started)

    async def _guarded(self, scope, receive, send, path: str):
        if path in OPEN_PATHS:
            return await self._app(scope, receive, send)
        peer = peer_of(path)
        headers = dict(scope["headers"])
        if self._expected is not None and not hmac.compare_digest(
                headers.get(b"authorization", b""), self._expected):
            return await error_response(peer, 401, "missing or wrong API key: send the header "
                                        "'Authorization: Bearer <key>'")(scope, receive, send)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await error_response(peer, 413, self._too_large_message(
                f"{int(length)} bytes"))(scope, receive, send)
        if self.drain.draining:
            return await error_response(peer, 503, self.drain.refusal)(scope, receive, send)
        if scope["method"] == "POST" and b"json" not in headers.get(b"content-type", b"json"):
            # Every route takes JSON: read it as such whatever it is labelled (curl -d says
            # application/x-www-form-urlencoded).
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"]
                                          if k != b"content-type"]
                     + [(b"content-type", b"application/json")]}
        sent = [False]

        async def sending(message):
            sent[0] = True
            await send(message)

        with self.drain.tracked():
            try:
                await self._app(scope, self._counted(receive), sending)
            except asyncio.CancelledError:
                reason = self.drain.cut_off_reason
                if reason is None or sent[0]:  # not the drain's doing
                    raise
                task = asyncio.current_task()
                if hasattr(task, "uncancel"):  # Python 3.11+: the task goes on after the cancel
                    task.uncancel()
                await error_response(peer, 503, reason)(scope, receive, send)

    async def _app(self, scope, receive, send):
        try:
            await self.app(scope, receive, send)
        except Exception:  # noqa: S110 (already answered 500 and logged by the app's handler)
            pass

    def _counted(self, receive):
        seen = [0]

        async def counted():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_body_bytes:  # the app answers it (no_route)
                    raise HTTPException(413, self._too_large_message("larger"))
            return message
        return counted

    def _too_large_message(self, size: str) -> str:
        return (f"the request body is {size}, more than the server's limit of "
                f"{self.max_body_bytes} bytes (--max-message-bytes): split it")

    def _label(self, path: str) -> str:
        """The path as a metric label: a route's, else 'other' (no label per stray path)."""
        return path if path in self.app.state.paths else "other"
