"""Admission limits, deadlines and cancellation against a real server on loopback."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import ServerProcess

from poolsvc.config import ServerConfig
from poolsvc.engine.engine import Engine
from poolsvc.engine.errors import DeadlineExceededError
from poolsvc.engine.params import Task, Truncation
from poolsvc.engine.request import PoolingRequest, now_ns
from poolsvc.gen.v1 import common_pb2, embed_pb2, embed_pb2_grpc
from poolsvc.service.server import PoolServer

PASSAGE = " ".join(["retrieval augmented generation needs fast embeddings"] * 30)


def passages(n: int) -> embed_pb2.EmbedRequest:
    return embed_pb2.EmbedRequest(inputs=[common_pb2.Input(text=PASSAGE)] * n,
                                  truncation=common_pb2.TruncationOptions(enabled=True))


def test_admission_limit_answers_resource_exhausted(tmp_path):
    srv = ServerProcess(tmp_path / "server.log", "--max-concurrent-requests", "2").wait_ready()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = embed_pb2_grpc.EmbedServiceStub(channel)
            calls = [stub.Embed.future(passages(16), timeout=120) for _ in range(12)]
            codes = [c.exception().code() if c.exception() else grpc.StatusCode.OK
                     for c in calls]
            refused = [c.exception().details() for c in calls if c.exception()]
            assert codes.count(grpc.StatusCode.OK) >= 2
            assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert "--max-concurrent-requests 2" in refused[0] and "retry" in refused[0]
            # once the load is gone, requests are admitted again
            assert list(stub.Embed(passages(1), timeout=60).embeddings.shape) == [1, 384]
    finally:
        assert srv.terminate() == 0


@pytest.fixture(scope="module")
def engine():
    eng = Engine(ServerConfig(threads=2).engine_config)
    eng.start()
    yield eng
    eng.shutdown()


def embed(texts, **kwargs) -> PoolingRequest:
    return PoolingRequest(Task.EMBED, tuple(texts), truncation=Truncation(enabled=True), **kwargs)


def test_expired_work_is_dropped_not_computed(engine):
    """Work whose deadline passes while it waits is never computed. The runner is held while
    the requests queue, so the outcome does not depend on how busy the machine is."""
    before = dict(engine.stats)
    with engine.held():
        busy = engine.submit(embed([PASSAGE] * 48))
        deadline = now_ns() + 500_000_000  # ample for tokenizing one short query
        late = engine.submit(embed(["a short query"], deadline_ns=deadline))
        while now_ns() <= deadline:  # held: nothing runs until the deadline has passed
            time.sleep(0.01)
    with pytest.raises(DeadlineExceededError, match="before the request reached the device"):
        late.result(120)
    busy.result(120)
    after = engine.stats
    assert after["sequences"] - before.get("sequences", 0) == 48  # the late one never ran
    assert after["expired"] - before.get("expired", 0) == 1
    with pytest.raises(DeadlineExceededError, match="during tokenization"):
        engine.submit(embed(["x"], deadline_ns=now_ns() - 1))


def test_cancelled_calls_are_dropped_from_the_queue():
    """Clients that time out or cancel leave nothing behind to compute. The runner is held while
    they give up, so what reaches the device does not depend on the machine's speed."""

    async def until(condition) -> None:
        for _ in range(6000):  # a minute at most
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the server never reached the expected state")

    async def scenario():
        server = PoolServer(ServerConfig(port=0, threads=2))
        await server.start()
        stats = server.engine.stats
        in_flight = lambda: server.engine.stats["in_flight"]  # noqa: E731
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = embed_pb2_grpc.EmbedServiceStub(channel)
            with server.engine.held():
                busy = asyncio.ensure_future(stub.Embed(passages(48), timeout=120))
                await until(lambda: in_flight() == 1)
                short = [stub.Embed(passages(4), timeout=0.2) for _ in range(5)]
                results = await asyncio.gather(*short, return_exceptions=True)
                # their deadline passed while queued, or the server saw at once that the work
                # ahead would not be done by then (RESOURCE_EXHAUSTED, load shed)
                assert all(isinstance(r, grpc.aio.AioRpcError) and r.code() in (
                    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
                    for r in results)
                # A short call admitted and queued holds its ticket until its handler ends,
                # which can be after the client's deadline fired.
                await until(lambda: in_flight() == 1)
                # The call object itself: a task wrapping it, cancelled before it first ran,
                # would leave the call going.
                cancelled = stub.Embed(passages(8), timeout=120)
                await until(lambda: in_flight() >= 2)  # admitted and queued
                cancelled.cancel()
                await until(lambda: in_flight() == 1)  # only the busy call is left
            assert list((await busy).embeddings.shape) == [48, 384]
            await until(lambda: in_flight() == 0)
            assert server.engine.stats["sequences"] - stats.get("sequences", 0) == 48
        await server.stop()

    asyncio.run(scenario())


def test_many_concurrent_callers_all_answered(tmp_path):
    srv = ServerProcess(tmp_path / "server.log").wait_ready()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = embed_pb2_grpc.EmbedServiceStub(channel)
            texts = [f"query number {i}" for i in range(200)]

            def call(t):
                return stub.Embed(embed_pb2.EmbedRequest(inputs=[common_pb2.Input(text=t)]),
                                  timeout=120)

            start = time.monotonic()
            with ThreadPoolExecutor(32) as pool:
                replies = list(pool.map(call, texts))
            assert all(list(r.embeddings.shape) == [1, 384] for r in replies)
            assert time.monotonic() - start < 120
    finally:
        assert srv.terminate() == 0
