"""Start-up, readiness and SIGTERM drain of a real server process."""

from __future__ import annotations

import asyncio
import queue
import re
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
from poolsvc.service.server import EXIT_MARGIN, PoolServer

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


class OpenStream:
    """An EmbedStream the test keeps open: the call is in flight on the server until close(), so
    a drain can be watched without racing the work's speed."""

    def __init__(self, channel: grpc.Channel):
        self._requests: queue.Queue = queue.Queue()
        self._responses = embed_pb2_grpc.EmbedServiceStub(channel).EmbedStream(
            iter(self._requests.get, None), timeout=120)

    def ask(self, i: int) -> embed_pb2.EmbedStreamResponse:
        self._requests.put(embed_pb2.EmbedStreamRequest(id=str(i), request=_passages(1)))
        return next(self._responses)

    def close(self) -> list:
        """Ends the requests; returns the responses still to come."""
        self._requests.put(None)
        return list(self._responses)

    def outcome(self) -> grpc.RpcError:
        """Sends nothing more, yet does not end the requests: what the server ends the call with."""
        try:
            with pytest.raises(grpc.RpcError) as info:
                next(self._responses)
            return info.value
        finally:
            self._requests.put(None)


def refused(call) -> str:
    """The details of a call the draining server refused (UNAVAILABLE, saying why)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    return info.value.details()


def test_sigterm_drains_calls_in_flight_and_tells_new_callers(tmp_path):
    # No load shedding: the calls below queue behind each other whatever this machine's speed
    # (shedding has its own tests); what is checked is how the drain treats them.
    srv = ServerProcess(tmp_path / "server.log", "--grace-period", "60",
                        "--max-queue-seconds", "1e6").wait_ready()
    with grpc.insecure_channel(srv.address) as channel:
        stub = embed_pb2_grpc.EmbedServiceStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                          timeout=120)
        assert next(watch).status == SERVING
        stream = OpenStream(channel)
        assert stream.ask(0).id == "0"  # in flight until closed
        calls = [stub.Embed.future(_passages(48), timeout=120) for _ in range(4)]
        srv.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING  # health flips at once, on open connections
        with grpc.insecure_channel(srv.address) as fresh:  # new connections are still accepted
            health = health_pb2_grpc.HealthStub(fresh)
            for service in ("", "poolsvc.v1.EmbedService"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
                assert reply.status == NOT_SERVING, service
            details = refused(lambda: embed_pb2_grpc.EmbedServiceStub(fresh).Embed(
                _passages(1), timeout=30))
            assert "shutting down and takes no new calls" in details
            refused(lambda: model_pb2_grpc.ModelServiceStub(fresh).ListModels(
                model_pb2.ListModelsRequest(), timeout=30))
        assert "shutting down" in refused(lambda: stub.Embed(_passages(1), timeout=30))
        assert stream.ask(1).WhichOneof("result") == "response"  # an open stream goes on
        for call in calls:  # answered in full, or (if it reached the server after SIGTERM) refused
            if call.exception() is None:
                assert list(call.result().embeddings.shape) == [48, 384]
            else:
                assert call.exception().code() == grpc.StatusCode.UNAVAILABLE
                assert "takes no new calls" in call.exception().details()
        assert stream.close() == []
    # The last call has finished: the server exits without using the rest of the 60 s.
    assert srv.proc.wait(30) == 0
    log = srv.log()
    assert "shutting down" in log and "poolsvc stopped" in log and "cut off" not in log
    srv.terminate()


def test_grace_period_bounds_the_drain_whatever_is_queued(tmp_path):
    grace = 2.0
    srv = ServerProcess(tmp_path / "server.log", "--grace-period", str(grace),
                        "--max-queue-seconds", "1e6").wait_ready()  # no shedding, as above
    with grpc.insecure_channel(srv.address) as channel:  # no retries: each call's own status
        stream = OpenStream(channel)
        assert stream.ask(0).WhichOneof("result") == "response"
        stub = embed_pb2_grpc.EmbedServiceStub(channel)
        calls = [stub.Embed.future(_passages(64), timeout=120) for _ in range(8)]
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        error = stream.outcome()  # still open when the grace period ends
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert f"--grace-period of {grace:g}s ran out" in error.details()
        assert srv.proc.wait(60) == 0
        # The product's bound: exit within --grace-period + EXIT_MARGIN, whatever is queued.
        assert time.monotonic() - started < grace + EXIT_MARGIN
        for call in calls:  # answered in full, or told why not: never a bare connection error
            if call.exception() is None:
                assert list(call.result().embeddings.shape) == [64, 384]
            else:
                assert call.exception().code() == grpc.StatusCode.UNAVAILABLE
                assert re.search(r"poolsvc (shut down before this call finished|is shutting "
                                 "down)", call.exception().details())
    assert "cut off" in srv.log()
    srv.terminate()


def test_a_second_signal_cuts_the_drain_short(tmp_path):
    srv = ServerProcess(tmp_path / "server.log", "--grace-period", "600").wait_ready()
    with grpc.insecure_channel(srv.address) as channel:
        stream = OpenStream(channel)
        assert stream.ask(0).WhichOneof("result") == "response"
        srv.proc.send_signal(signal.SIGTERM)
        assert "shutting down" in refused(lambda: embed_pb2_grpc.EmbedServiceStub(
            channel).Embed(_passages(1), timeout=30))  # the first signal has been handled
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGINT)  # Ctrl-C again
        error = stream.outcome()
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "second signal" in error.details()
        assert srv.proc.wait(60) == 0
        assert time.monotonic() - started < EXIT_MARGIN
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
    # a removed flag says what replaces it, and is no longer offered
    for command in ("serve", "run-batch"):
        done = subprocess.run([sys.executable, "-m", "poolsvc", command, "--quantize", "int8"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "--quantize: int8 quantization was removed" in done.stderr
        assert "use --dtype=bfloat16" in done.stderr
        helped = subprocess.run([sys.executable, "-m", "poolsvc", command, "--help"],
                                capture_output=True, text=True, timeout=60)
        assert "--dtype" in helped.stdout and "--quantize" not in helped.stdout
