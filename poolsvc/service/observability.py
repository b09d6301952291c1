"""Prometheus metrics with HTTP probes, OpenTelemetry spans, and JSON logs."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKENS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    """The server's metrics, in a registry of their own (several servers may share a process)."""

    def __init__(self, queue_depth, in_flight):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("poolsvc_requests", "RPCs (stream items count one each), by "
                                "method and status code", ["rpc", "code"], registry=registry)
        self.request_seconds = Histogram("poolsvc_request_duration_seconds", "RPC duration",
                                         ["rpc"], buckets=_LATENCY, registry=registry)
        self.queue_seconds = Histogram("poolsvc_queue_duration_seconds", "time waiting for the "
                                       "device, after tokenization", buckets=_LATENCY,
                                       registry=registry)
        self.tokenize_seconds = Histogram("poolsvc_tokenization_duration_seconds",
                                          "tokenization time per request", buckets=_LATENCY,
                                          registry=registry)
        self.inference_seconds = Histogram("poolsvc_inference_duration_seconds", "time on the "
                                           "device per request", buckets=_LATENCY,
                                           registry=registry)
        self.batch_size = Histogram("poolsvc_batch_size", "sequences per device batch",
                                    ["model"], buckets=_SIZES, registry=registry)
        self.batch_tokens = Histogram("poolsvc_batch_tokens", "tokens per device batch",
                                      ["model"], buckets=_TOKENS, registry=registry)
        self.batch_seconds = Histogram("poolsvc_batch_duration_seconds", "device time per batch",
                                       ["model"], buckets=_LATENCY, registry=registry)
        self.tokens = Counter("poolsvc_tokens", "tokens processed", ["model"], registry=registry)
        Gauge("poolsvc_queue_depth", "sequences waiting for the device",
              registry=registry).set_function(queue_depth)
        Gauge("poolsvc_requests_in_flight", "requests admitted and not answered",
              registry=registry).set_function(in_flight)

    def on_batch(self, model: str, sequences: int, tokens: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(sequences)
        self.batch_tokens.labels(model).observe(tokens)
        self.batch_seconds.labels(model).observe(seconds)
        self.tokens.labels(model).inc(tokens)

    def on_timing(self, timing) -> None:
        """A response's Timing message."""
        self.queue_seconds.observe(timing.queue_ns / 1e9)
        self.tokenize_seconds.observe(timing.tokenization_ns / 1e9)
        self.inference_seconds.observe(timing.inference_ns / 1e9)

    def on_rpc(self, rpc: str, code: str, seconds: float) -> None:
        self.requests.labels(rpc, code).inc()
        self.request_seconds.labels(rpc).observe(seconds)


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` of them: further connections are
    closed at once rather than given a thread each."""

    daemon_threads = True
    max_connections = 16
    request_queue_size = 128  # the listen backlog: connections are refused past it

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(self.max_connections)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class ProbeServer:
    """/metrics for Prometheus, /healthz (alive) and /readyz (models loaded, not draining) for
    HTTP health checks (load balancers, haproxy, plain Kubernetes httpGet probes). GET and HEAD;
    at most 16 connections at once, each given 5 s to send its request."""

    def __init__(self, host: str, port: int, metrics: Metrics, ready):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "poolsvc"  # not the Python version http.server shows by default
            sys_version = ""
            timeout = 5  # seconds a connection may take to send its request

            def do_GET(self, body: bool = True):  # noqa: N802 (http.server's name)
                path = self.path.split("?")[0]
                if path == "/metrics":
                    outer._send(self, 200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST,
                                body=body)
                elif path == "/healthz":
                    outer._send(self, 200, b"ok\n", body=body)
                elif path == "/readyz":
                    ok = ready()
                    outer._send(self, 200 if ok else 503, b"ready\n" if ok else b"not ready\n",
                                body=body)
                else:
                    outer._send(self, 404, b"not found: /metrics, /healthz, /readyz\n", body=body)

            def do_HEAD(self):  # noqa: N802
                self.do_GET(body=False)

            def log_message(self, *args):  # probes every few seconds: keep the log quiet
                pass

        self._http = _BoundedHTTPServer((host, port), Handler)
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, name="poolsvc-probes",
                                        daemon=True)

    @staticmethod
    def _send(handler, code: int, payload: bytes, content_type: str = "text/plain",
              body: bool = True) -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        if body:
            handler.wfile.write(payload)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()


def rpc_span(rpc: str, metadata):
    """An OpenTelemetry span for one RPC, child of the caller's W3C trace context (the
    `traceparent` metadata) when the opentelemetry packages are installed; else nothing."""
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        return contextlib.nullcontext()
    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    parent = TraceContextTextMapPropagator().extract(carrier)
    return trace.get_tracer("poolsvc").start_as_current_span(
        rpc, context=parent, kind=trace.SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.method": rpc.rsplit("/", 1)[-1],
                    "rpc.service": rpc.rsplit("/", 1)[0]})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z", "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)
