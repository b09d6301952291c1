"""The server's life: listen, load models, SERVING, and on SIGTERM a bounded drain.

Shutdown, from SIGTERM (or Ctrl-C) on: health turns NOT_SERVING; the port stays open, so probes
get answers and new model calls get UNAVAILABLE with the reason; calls in flight get
--grace-period seconds, then those still running end with UNAVAILABLE saying so; the port closes,
queued work is dropped, and the process exits within --grace-period + EXIT_MARGIN seconds whatever
is queued (it does not wait for a batch nobody is waiting for). A second signal cuts off the
calls in flight at once.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from poolsvc.config import ServerConfig
from poolsvc.engine.engine import Engine
from poolsvc.engine.params import Task
from poolsvc.gen.v1 import classify_pb2, embed_pb2, encode_pb2, model_pb2, score_pb2
from poolsvc.service import reflection
from poolsvc.service.drain import Drain
from poolsvc.service.handlers import generic_handler
from poolsvc.service.observability import Metrics, ProbeServer
from poolsvc.service.security import BearerTokenInterceptor, server_credentials
from poolsvc.service.servicers import SERVICERS

log = logging.getLogger(__name__)

_TRANSPORT_MARGIN = 1 << 20
EXIT_MARGIN = 5.0  # seconds past --grace-period by which a SIGTERM'd server has exited
_LINGER = 1.0  # the port stays open this long after a cut-off, so retries get the reason
_ENGINE_JOIN = 1.0  # the most stop() waits for the device thread to finish its batch
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _name(module, service: str) -> str:
    return module.DESCRIPTOR.services_by_name[service].full_name


# Each poolsvc service and the tasks behind it: health reports a service SERVING when the models
# are warm and one of them serves one of its tasks.
SERVICE_TASKS = {
    _name(embed_pb2, "EmbedService"): {Task.EMBED},
    _name(classify_pb2, "ClassifyService"): {Task.CLASSIFY},
    _name(score_pb2, "ScoreService"): {Task.SCORE},
    _name(encode_pb2, "EncodeService"): set(Task) - {Task.SCORE},
    _name(model_pb2, "ModelService"): set(Task),
}


class PoolServer:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = Metrics(queue_depth=lambda: self.engine.stats["queued"],
                               in_flight=lambda: self.engine.stats["in_flight"])
        self.engine = Engine(config.engine_config, config.limits, on_batch=self.metrics.on_batch)
        self.pool = ThreadPoolExecutor(config.tokenizer_workers or os.cpu_count(),
                                       thread_name_prefix="poolsvc-tokenize")
        self.health = HealthServicer()
        self.drain = Drain()
        self.serving = False
        _check_port_free(config.host, config.port)
        limit = config.max_message_bytes
        key = config.read_api_key()
        # gRPC itself takes messages a little over the limit, so that a stream item over it
        # gets its own error answer instead of ending the stream (the servicers check it).
        transport_limit = limit + _TRANSPORT_MARGIN
        self.server = grpc.aio.server(
            interceptors=[self.drain, *([BearerTokenInterceptor(key)] if key else [])],
            options=[("grpc.max_receive_message_length", transport_limit),
                     ("grpc.max_send_message_length", transport_limit),
                     ("grpc.so_reuseport", 0)])
        for module in (embed_pb2, classify_pb2, score_pb2, encode_pb2, model_pb2):
            for service in module.DESCRIPTOR.services_by_name.values():
                servicer = SERVICERS[service.full_name](
                    self.engine, self.pool, self.metrics, stream_limit=config.max_stream_inflight,
                    max_message_bytes=limit)
                self.server.add_generic_rpc_handlers((generic_handler(servicer, service),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable(self.server, (*SERVICE_TASKS, health_name))
        credentials = server_credentials(config)
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(config.address)
            else:
                self.port = self.server.add_secure_port(config.address, credentials)
        except RuntimeError:  # gRPC's own message only says "set GRPC_VERBOSITY=debug"
            raise ListenError(f"cannot listen on {config.address}: the port is taken or the "
                              "address is not this machine's; check --host and --port") from None
        self.http = None
        if config.http_port:
            self.http = _http_server(config, self.engine, self.pool, self.metrics, self.drain,
                                     key, ready=lambda: self.serving)
        self.probes = None
        if config.metrics_port:
            try:
                self.probes = ProbeServer(config.host, config.metrics_port, self.metrics,
                                          ready=lambda: self.serving)
            except OSError as exc:
                raise ListenError(f"cannot serve metrics on {config.host}:{config.metrics_port}: "
                                  f"{exc.strerror}; choose another port with --metrics-port "
                                  "(0: off)") from None

    async def start(self) -> None:
        """Listens at once (health NOT_SERVING, model calls UNAVAILABLE), then loads the models."""
        for name in ("", *SERVICE_TASKS):
            await self.health.set(name, NOT_SERVING)
        await self.server.start()
        if self.http is not None:
            await self.http.start()
            log.info("HTTP/JSON routes on %s (OpenAPI: /openapi.json)", self.http.url)
        if self.probes is not None:
            self.probes.start()
            log.info("metrics and probes on http://%s:%d/metrics, /healthz, /readyz",
                     self.config.host, self.probes.port)
        log.info("poolsvc listening on %s:%d%s; loading models", self.config.host, self.port,
                 " (TLS)" if self.config.tls_cert else "")
        await _in_daemon_thread(self.engine.start)
        served = {t for model in self.engine.describe() for t in model.tasks}
        await self.health.set("", SERVING)
        for name, tasks in SERVICE_TASKS.items():
            await self.health.set(name, SERVING if tasks & served else NOT_SERVING)
        self.serving = True
        names = ", ".join(m.name for m in self.engine.describe())
        log.info("poolsvc serving %s on %s:%d", names, self.config.host, self.port)

    async def stop(self) -> bool:
        """Drains as the module docstring says; returns within the grace period + EXIT_MARGIN,
        False if the device thread was still running a batch then."""
        grace = self.config.grace_period
        self.serving = False
        await self.health.enter_graceful_shutdown()
        log.info("shutting down: %d calls in flight have %gs to finish; new calls are refused",
                 self.drain.in_flight, grace)
        cut = await self.drain.drain(grace)
        if cut:
            log.warning("cut off %d calls still running after the %gs grace period", cut, grace)
            await asyncio.sleep(_LINGER)
        await self.server.stop(0.5)  # closes the port; ends health watches and reflection
        if self.http is not None:
            await self.http.stop()
        # Every model call has now been answered: what is queued or running is nobody's.
        joined = await _in_daemon_thread(lambda: self.engine.shutdown(True), _ENGINE_JOIN,
                                         name="poolsvc-shutdown")
        if not joined:
            log.warning("not waiting for the batch on the device: nobody waits for its result")
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.probes is not None:
            self.probes.stop()
        log.info("poolsvc stopped")
        return joined


class ListenError(RuntimeError):
    """The gRPC address cannot be listened on; the message names the flag to change."""


def _http_server(config: ServerConfig, engine, pool, metrics, drain, key: str, ready):
    """The HTTP port's server (imported only when it is on: FastAPI and uvicorn are the
    `http` extra)."""
    try:
        from poolsvc.http.app import Guard, build_app
        from poolsvc.http.common import Front
        from poolsvc.http.server import HttpServer
    except ImportError as exc:
        raise ListenError(f"--http-port needs FastAPI and uvicorn ({exc}): pip install "
                          "'poolsvc[http]'") from None
    app = build_app(Front(engine, pool), metrics, ready)
    guarded = Guard(app, api_key=key, max_body_bytes=config.max_message_bytes, drain=drain,
                    metrics=metrics)
    return HttpServer(config, guarded)


def _check_port_free(host: str, port: int) -> None:
    """Binds the port once ourselves, the way gRPC will (SO_REUSEADDR, no SO_REUSEPORT), so that a
    taken port is reported in one line naming --port rather than as gRPC core's log line."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {host}: {exc.strerror}; check --host") from None
    failures = []
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
                return  # gRPC listens if any resolved address binds
            except OSError as exc:
                failures.append(exc)
    if any(exc.errno == errno.EADDRINUSE for exc in failures):
        raise ListenError(f"port {port} on {host} is already in use (another poolsvc?): stop that "
                          "process or choose another port with --port")
    reason = failures[0].strerror if failures else "no address"
    raise ListenError(f"cannot listen on {host}:{port}: {reason}; check --host and --port")


async def _in_daemon_thread(fn, timeout: float | None = None, name: str = "poolsvc-load") -> bool:
    """Runs blocking `fn` without tying process exit to it (a signal during a long model load
    must still end the process). Returns False if `timeout` passed first (`fn` runs on)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(outcome) -> None:
        try:
            loop.call_soon_threadsafe(outcome)
        except RuntimeError:  # the loop has closed: nobody awaits this any more
            pass

    def target():
        try:
            fn()
        except BaseException as exc:  # handed to the awaiting coroutine
            settle(lambda e=exc: done.done() or done.set_exception(e))
        else:
            settle(lambda: done.done() or done.set_result(None))

    threading.Thread(target=target, name=name, daemon=True).start()
    try:
        await asyncio.wait_for(done, timeout)
    except asyncio.TimeoutError:
        return False
    return True


async def serve(config: ServerConfig) -> bool:
    """Runs until SIGTERM or SIGINT, then drains (a second signal cuts the drain short).
    Returns False if a batch is still running on the device thread (see PoolServer.stop)."""
    server = PoolServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():  # the second one: do not wait for the grace period
            log.warning("second signal: cutting off the calls in flight now")
            asyncio.ensure_future(server.drain.cut_off(
                "poolsvc was stopped (a second signal) before this call finished; retry on "
                "another replica", "poolsvc is shutting down (a second signal cut off the calls "
                "in flight) and takes no new calls; retry on another replica"))
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    starting = asyncio.create_task(server.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and starting.exception() is not None:
        stopping.cancel()
        await server.server.stop(0)
        raise starting.exception()
    await stopping
    starting.cancel()
    return await server.stop()
