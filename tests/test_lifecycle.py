"""Start-up, readiness and SIGTERM drain of a real server process."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from conftest import ROOT, ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc

from poolsvc.config import ServerConfig
from poolsvc.gen.v1 import common_pb2, embed_pb2, embed_pb2_grpc, model_pb2, model_pb2_grpc
from poolsvc.service.server import PoolServer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _passages(n: int) -> embed_pb2.EmbedRequest:
    text = " ".join(["retrieval augmented generation needs fast embeddings"] * 30)
    return embed_pb2.EmbedRequest(inputs=[common_pb2.Input(text=text)] * n,
                                  truncation=common_pb2.TruncationOptions(enabled=True))


def test_not_serving_until_the_model_is_warm():
    """In-process server whose model load waits on a gate, to look at it while loading."""

    async def scenario():
        server = PoolServer(ServerConfig(port=0, threads=2))
        gate = threading.Event()
        real_start = server.engine.start
        server.engine.start = lambda: (gate.wait(60), real_start())
        starting = asyncio.create_task(server.start())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await asyncio.sleep(0.2)  # the server listens before the model loads
            for service in ("", "poolsvc.v1.EmbedService", "poolsvc.v1.ModelService"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == NOT_SERVING, service
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await embed_pb2_grpc.EmbedServiceStub(channel).Embed(
                    embed_pb2.EmbedRequest(inputs=[common_pb2.Input(text="early")]))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "not serving" in info.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await model_pb2_grpc.ModelServiceStub(channel).GetModelInfo(
                    model_pb2.GetModelInfoRequest())
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading" in info.value.details()

            gate.set()
            await asyncio.wait_for(starting, 120)
            for service in ("", "poolsvc.v1.EmbedService", "poolsvc.v1.ModelService"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == SERVING, service
            reply = await health.Check(health_pb2.HealthCheckRequest(
                service="poolsvc.v1.ClassifyService"))
            assert reply.status == NOT_SERVING  # no classification model is served
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            out = await embed_pb2_grpc.EmbedServiceStub(channel).Embed(
                embed_pb2.EmbedRequest(inputs=[common_pb2.Input(text="now")]))
            assert list(out.embeddings.shape) == [1, 384]
        await server.stop()

    asyncio.run(scenario())


def test_sigterm_finishes_in_flight_calls_and_exits_zero(tmp_path):
    srv = ServerProcess(tmp_path / "server.log", "--grace-period", "60").wait_ready()
    with grpc.insecure_channel(srv.address) as channel:
        stub = embed_pb2_grpc.EmbedServiceStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                          timeout=120)
        assert next(watch).status == SERVING
        calls = [stub.Embed.future(_passages(48), timeout=120) for _ in range(4)]
        time.sleep(1.0)  # accepted and queued: 4 x 48 passages keep 2 cores busy for seconds
        assert not any(c.done() for c in calls), "the load finished before SIGTERM"
        srv.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING  # health flips at once
        for call in calls:  # every accepted call is answered in full
            response = call.result()
            assert list(response.embeddings.shape) == [48, 384]
        with pytest.raises(grpc.RpcError) as info:  # new calls are refused
            stub.Embed(_passages(1), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert srv.terminate() == 0
    assert "shutting down" in srv.log() and "poolsvc stopped" in srv.log()


def test_grace_period_bounds_the_drain(tmp_path):
    srv = ServerProcess(tmp_path / "server.log", "--grace-period", "0.5").wait_ready()
    with grpc.insecure_channel(srv.address) as channel:
        stub = embed_pb2_grpc.EmbedServiceStub(channel)
        calls = [stub.Embed.future(_passages(64), timeout=120) for _ in range(6)]
        time.sleep(1.0)
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0
        assert time.monotonic() - started < 30
        codes = {c.exception().code() if c.exception() else grpc.StatusCode.OK for c in calls}
        assert codes - {grpc.StatusCode.OK} <= {grpc.StatusCode.CANCELLED,
                                                grpc.StatusCode.UNAVAILABLE}
        assert codes != {grpc.StatusCode.OK}, "the drain was not cut short"
    srv.terminate()


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/dir"], "is not a directory"),
    (["--model", str(ROOT / "tests")], "has no config.json"),
])
def test_unservable_model_exits_nonzero_with_the_reason(args, message):
    done = subprocess.run([sys.executable, "-m", "poolsvc", "serve", "--port", "0", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "cannot serve" in done.stderr and message in done.stderr


def test_bad_flags_are_usage_errors():
    serve = [sys.executable, "-m", "poolsvc", "serve", "--port", "0"]  # never a fixed port
    done = subprocess.run([*serve, "--max-batch-tokens", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--max-batch-tokens must be at least 1" in done.stderr
    done = subprocess.run([*serve, "--max-batch-tokens", "100"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "below all-MiniLM-L6-v2's 256-token input limit" in done.stderr
