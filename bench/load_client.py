"""The load generator of bench/bench.py and bench/http_vs_grpc.py: a separate process driving a
poolsvc server over gRPC, or over its HTTP port's /v1/embeddings (`--mode http`; the address is
then the HTTP port's; vectors as base64, which the OpenAI SDKs ask for).

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


async def http(address: str, texts: list[str], batch: int,
               concurrency: int) -> tuple[list[float], int]:
    """POST /v1/embeddings with `concurrency` callers on keep-alive connections."""
    import base64

    import httpx
    import numpy as np

    latencies: list[float] = []
    tokens = 0
    queue = iter([texts[i:i + batch] for i in range(0, len(texts), batch)])
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"http://{address}", limits=limits,
                                 timeout=600) as client:
        async def caller():
            nonlocal tokens
            for chunk in queue:
                start = time.perf_counter()
                reply = await client.post("/v1/embeddings", json={
                    "input": chunk, "encoding_format": "base64", "truncate_prompt_tokens": -1})
                reply.raise_for_status()
                body = reply.json()
                for item in body["data"]:
                    np.frombuffer(base64.b64decode(item["embedding"]), "<f4")
                latencies.append(time.perf_counter() - start)
                tokens += body["usage"]["total_tokens"]

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
    parser.add_argument("--mode", choices=("unary", "stream", "http"), default="unary")
    parser.add_argument("--batch", type=int, default=1, help="texts per request")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="callers in flight (unary) or the stream's window")
    parser.add_argument("--repeat", type=int, default=1, help="send the texts this many times")
    args = parser.parse_args()
    texts = json.loads(Path(args.texts).read_text()) * args.repeat
    if args.mode == "http":
        start = time.perf_counter()
        latencies, tokens = await http(args.address, texts, args.batch, args.concurrency)
        print(json.dumps({"wall": time.perf_counter() - start, "texts": len(texts),
                          "tokens": tokens, "latencies": latencies}))
        return
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
