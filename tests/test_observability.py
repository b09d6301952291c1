"""Prometheus metrics, HTTP probes, timing trailers, JSON logs and trace context."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import urllib.error
import urllib.request

import grpc
from conftest import ServerProcess
from test_security import free_port

from poolsvc.config import ServerConfig
from poolsvc.gen.v1 import common_pb2, embed_pb2, embed_pb2_grpc
from poolsvc.service.server import PoolServer


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def sample(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$" if labels else \
        rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$"
    values = [float(m.group(1)) for m in re.finditer(pattern, text, re.M)]
    assert values, f"no {name}{labels} in the metrics"
    return sum(values)


def test_metrics_probes_trailers_and_json_logs(tmp_path):
    port = free_port()
    srv = ServerProcess(tmp_path / "server.log", "--metrics-port", str(port), "--log-format",
                        "json").wait_ready()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = embed_pb2_grpc.EmbedServiceStub(channel)
            request = embed_pb2.EmbedRequest(inputs=[common_pb2.Input(text="metric me")] * 3)
            for _ in range(5):
                reply, call = stub.Embed.with_call(request, timeout=30)
            trailers = dict(call.trailing_metadata())
            assert int(trailers["poolsvc-total-ns"]) == reply.timing.total_ns > 0
            assert int(trailers["poolsvc-inference-ns"]) == reply.timing.inference_ns
            try:
                stub.Embed(embed_pb2.EmbedRequest(), timeout=30)
            except grpc.RpcError:
                pass
            list(stub.EmbedStream(iter([embed_pb2.EmbedStreamRequest(id="a", request=request)]),
                                  timeout=30))
        text = scrape(port)
        embed = '{code="OK",rpc="poolsvc.v1.EmbedService/Embed"}'
        assert sample(text, "poolsvc_requests_total", embed) == 5
        assert sample(text, "poolsvc_requests_total",
                      '{code="INVALID_ARGUMENT",rpc="poolsvc.v1.EmbedService/Embed"}') == 1
        assert sample(text, "poolsvc_requests_total",
                      '{code="OK",rpc="poolsvc.v1.EmbedService/EmbedStream"}') == 1
        # [CLS] metric me [SEP]: 4 tokens x 3 inputs x 6 requests (5 unary, 1 on the stream)
        assert sample(text, "poolsvc_tokens_total") == 4 * 3 * 6
        assert sample(text, "poolsvc_batch_tokens_sum") == 4 * 3 * 6
        assert sample(text, "poolsvc_batch_size_sum") == 3 * 6
        for name in ("poolsvc_request_duration_seconds_count",
                     "poolsvc_queue_duration_seconds_count",
                     "poolsvc_tokenization_duration_seconds_count",
                     "poolsvc_inference_duration_seconds_count"):
            assert sample(text, name) >= 6
        assert sample(text, "poolsvc_queue_depth") == 0
        assert sample(text, "poolsvc_requests_in_flight") == 0
        for path in ("/healthz", "/readyz"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                assert r.status == 200
    finally:
        assert srv.terminate() == 0
    lines = [json.loads(line) for line in srv.log().splitlines() if line.startswith("{")]
    assert any("poolsvc serving" in entry["message"] for entry in lines)
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in lines)


def test_readyz_follows_loading_and_drain():
    async def scenario():
        port = free_port()
        server = PoolServer(ServerConfig(port=0, threads=2, metrics_port=port))
        gate = threading.Event()
        real_start = server.engine.start
        server.engine.start = lambda: (gate.wait(60), real_start())
        starting = asyncio.create_task(server.start())
        await asyncio.sleep(0.2)

        def readyz() -> int:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as err:
                return err.code

        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, readyz) == 503
        gate.set()
        await asyncio.wait_for(starting, 120)
        assert await loop.run_in_executor(None, readyz) == 200
        await server.stop()

    asyncio.run(scenario())


def test_trace_context_from_metadata_becomes_the_parent_span():
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"

    async def scenario():
        server = PoolServer(ServerConfig(port=0, threads=2))
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            await embed_pb2_grpc.EmbedServiceStub(channel).Embed(
                embed_pb2.EmbedRequest(inputs=[common_pb2.Input(text="traced")]),
                metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),))
        await server.stop()

    asyncio.run(scenario())
    (span,) = [s for s in exporter.get_finished_spans()
               if s.name == "poolsvc.v1.EmbedService/Embed"]
    assert f"{span.context.trace_id:032x}" == trace_id
    assert f"{span.parent.span_id:016x}" == parent_id
    assert span.attributes["rpc.system"] == "grpc"
