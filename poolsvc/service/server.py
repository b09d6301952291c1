"""The server's life: listen, load models, SERVING, and on SIGTERM a graceful drain."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
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
from poolsvc.service.handlers import generic_handler
from poolsvc.service.observability import Metrics, ProbeServer
from poolsvc.service.security import BearerTokenInterceptor, server_credentials
from poolsvc.service.servicers import SERVICERS

log = logging.getLogger(__name__)

_TRANSPORT_MARGIN = 1 << 20
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
        self.serving = False
        limit = config.max_message_bytes
        key = config.read_api_key()
        # gRPC itself takes messages a little over the limit, so that a stream item over it
        # gets its own error answer instead of ending the stream (the servicers check it).
        transport_limit = limit + _TRANSPORT_MARGIN
        self.server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(key)] if key else [],
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
        if credentials is None:
            self.port = self.server.add_insecure_port(config.address)
        else:
            self.port = self.server.add_secure_port(config.address, credentials)
        self.probes = None
        if config.metrics_port:
            self.probes = ProbeServer(config.host, config.metrics_port, self.metrics,
                                      ready=lambda: self.serving)

    async def start(self) -> None:
        """Listens at once (health NOT_SERVING, model calls UNAVAILABLE), then loads the models."""
        for name in ("", *SERVICE_TASKS):
            await self.health.set(name, NOT_SERVING)
        await self.server.start()
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

    async def stop(self) -> None:
        """Health NOT_SERVING, refuse new calls, give in-flight ones the grace period, drain."""
        self.serving = False
        await self.health.enter_graceful_shutdown()
        log.info("shutting down: in-flight calls have %.1fs", self.config.grace_period)
        await self.server.stop(self.config.grace_period)
        # Every call has now been answered or cancelled: what still waits is nobody's.
        await asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown, True)
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.probes is not None:
            self.probes.stop()
        log.info("poolsvc stopped")


async def _in_daemon_thread(fn) -> None:
    """Runs blocking `fn` without tying process exit to it (a signal during a long model load
    must still end the process)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def target():
        try:
            fn()
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(lambda e=exc: done.done() or done.set_exception(e))
        else:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    threading.Thread(target=target, name="poolsvc-load", daemon=True).start()
    await done


async def serve(config: ServerConfig) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    server = PoolServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(server.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and starting.exception() is not None:
        stopping.cancel()
        await server.server.stop(0)
        raise starting.exception()
    await stopping
    starting.cancel()
    await server.stop()
