"""The load generator of bench/bench.py: a separate process driving a poolsvc server over gRPC.

    python bench/load_client.py --address 127.0.0.1:50051 --texts texts.json --mode unary \
        --batch 1 --concurrency 64

Prints one JSON object: wall seconds, texts, tokens (from the server's usage), and every
request's latency in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import grpc
from poolsvc_client import decode_tensor

from poolsvc.gen.v1 import common_pb2, embed_pb2, embed_pb2_grpc


def requests(texts: list[str], batch: int) -> list[embed_pb2.EmbedRequest]:
    truncate = common_pb2.TruncationOptions(enabled=True)
    return [embed_pb2.EmbedRequest(inputs=[common_pb2.Input(text=t) for t in texts[i:i + batch]],
                                   truncation=truncate)
            for i in range(0, len(texts), batch)]


async def unary(stub, work: list, concurrency: int) -> tuple[list[float], int]:
    latencies: list[float] = []
    tokens = 0
    queue = iter(work)

    async def caller():
        nonlocal tokens
        for request in queue:
            start = time.perf_counter()
            reply = await stub.Embed(request)
            decode_tensor(reply.embeddings)
            latencies.append(time.perf_counter() - start)
            tokens += reply.usage.total_tokens

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies, tokens


async def stream(stub, work: list, window: int) -> tuple[list[float], int]:
    """One bidirectional stream, at most `window` requests in flight."""
    sent: dict[str, float] = {}
    latencies: list[float] = []
    tokens = 0
    slots = asyncio.Semaphore(window)

    async def produce():
        for i, request in enumerate(work):
            await slots.acquire()
            sent[str(i)] = time.perf_counter()
            yield embed_pb2.EmbedStreamRequest(id=str(i), request=request)

    async for reply in stub.EmbedStream(produce()):
        if reply.WhichOneof("result") != "response":
            raise RuntimeError(reply.error.message)
        decode_tensor(reply.response.embeddings)
        latencies.append(time.perf_counter() - sent.pop(reply.id))
        tokens += reply.response.usage.total_tokens
        slots.release()
    return latencies, tokens


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--texts", required=True, help="a JSON list of strings")
    parser.add_argument("--mode", choices=("unary", "stream"), default="unary")
    parser.add_argument("--batch", type=int, default=1, help="texts per request")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="callers in flight (unary) or the stream's window")
    parser.add_argument("--repeat", type=int, default=1, help="send the texts this many times")
    args = parser.parse_args()
    texts = json.loads(Path(args.texts).read_text()) * args.repeat
    work = requests(texts, args.batch)
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(args.address, options=options) as channel:
        stub = embed_pb2_grpc.EmbedServiceStub(channel)
        start = time.perf_counter()
        if args.mode == "unary":
            latencies, tokens = await unary(stub, work, args.concurrency)
        else:
            latencies, tokens = await stream(stub, work, args.concurrency)
        wall = time.perf_counter() - start
    print(json.dumps({"wall": wall, "texts": len(texts), "tokens": tokens,
                      "latencies": latencies}))


if __name__ == "__main__":
    asyncio.run(main())
