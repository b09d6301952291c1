"""Request limits answer RESOURCE_EXHAUSTED naming the limit; streams push back."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from conftest import ServerProcess

from poolsvc.config import ServerConfig
from poolsvc.gen.v1 import (
    common_pb2,
    embed_pb2,
    embed_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
    score_pb2,
    score_pb2_grpc,
)
from poolsvc.service.server import PoolServer

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def text(t: str) -> common_pb2.Input:
    return common_pb2.Input(text=t)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("limits") / "server.log",
                        "--max-inputs-per-request", "8", "--max-chars-per-input", "1000",
                        "--max-message-bytes", "65536").wait_ready()
    with grpc.insecure_channel(srv.address) as channel:
        yield channel
    assert srv.terminate() == 0


def code_and_details(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("what,call,fragments", [
    ("inputs", lambda ch: embed_pb2_grpc.EmbedServiceStub(ch).Embed(
        embed_pb2.EmbedRequest(inputs=[text("a")] * 9), timeout=30),
     ["9 inputs", "limit of 8", "--max-inputs-per-request"]),
    ("score pairs", lambda ch: score_pb2_grpc.ScoreServiceStub(ch).Score(
        score_pb2.ScoreRequest(queries=[text("q")], documents=[text("d")] * 9), timeout=30),
     ["9 inputs", "--max-inputs-per-request"]),
    ("characters", lambda ch: embed_pb2_grpc.EmbedServiceStub(ch).Embed(
        embed_pb2.EmbedRequest(inputs=[text("ok"), text("x" * 1001)]), timeout=30),
     ["input 1 has 1001 characters", "--max-chars-per-input"]),
    ("tokenize characters", lambda ch: model_pb2_grpc.ModelServiceStub(ch).Tokenize(
        model_pb2.TokenizeRequest(texts=["y" * 5000]), timeout=30), ["--max-chars-per-input"]),
    ("message size", lambda ch: embed_pb2_grpc.EmbedServiceStub(ch).Embed(
        embed_pb2.EmbedRequest(inputs=[text("z" * 200_000)]), timeout=30), ["65536"]),
])
def test_limits(small, what, call, fragments):
    code, details = code_and_details(lambda: call(small))
    assert code == EXHAUSTED, (what, code, details)
    for fragment in fragments:
        assert fragment in details, details


def test_within_limits_still_served(small):
    stub = embed_pb2_grpc.EmbedServiceStub(small)
    reply = stub.Embed(embed_pb2.EmbedRequest(inputs=[text("x" * 1000)] * 8,
                                              truncation=common_pb2.TruncationOptions(
                                                  enabled=True)), timeout=60)
    assert list(reply.embeddings.shape) == [8, 384]


def test_a_stream_has_at_most_its_limit_in_flight():
    """Past --max-stream-inflight the server stops reading the stream (HTTP/2 flow control
    holds the client back) instead of queueing everything the client sends."""

    async def scenario():
        server = PoolServer(ServerConfig(port=0, threads=2, max_stream_inflight=3))
        await server.start()
        peak = 0

        async def watch():
            nonlocal peak
            while True:
                peak = max(peak, server.engine.stats["in_flight"])
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        passage = " ".join(["flow control keeps memory bounded"] * 20)
        requests = [embed_pb2.EmbedStreamRequest(id=str(i), request=embed_pb2.EmbedRequest(
            inputs=[text(passage)] * 4)) for i in range(24)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            replies = [r async for r in embed_pb2_grpc.EmbedServiceStub(channel).EmbedStream(
                iter(requests))]
        watcher.cancel()
        await server.stop()
        assert sorted(int(r.id) for r in replies) == list(range(24))
        assert all(r.WhichOneof("result") == "response" for r in replies)
        assert 1 <= peak <= 3

    asyncio.run(scenario())
