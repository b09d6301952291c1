"""Hostile input and overload against live servers: what one request can cost is bounded, work
is refused before it is done, and streams survive bad items. The bounds asserted are limits of
the product at its default settings (stated in the README's "Limits and overload"), not timings
of this machine."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from conftest import ROOT, ServerProcess
from poolsvc_client import decode_tensor
from test_production import POOL, Load, rss_kib
from test_security import free_port
from tiny_models import tiny_bert

from poolsvc.config import ServerConfig
from poolsvc.gen.v1 import (
    common_pb2,
    embed_pb2,
    embed_pb2_grpc,
    encode_pb2,
    encode_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
)
from poolsvc.service.server import PoolServer

KEY = "hostile-test-key"
AUTH = (("authorization", f"Bearer {KEY}"),)
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
TRUNCATE = common_pb2.TruncationOptions(enabled=True)
PASSAGE = " ".join(["retrieval augmented generation needs fast embeddings"] * 30)
DENSE = "x " * 480  # 480 tokens in 960 characters: 2048 of them stay under the character limits
BIG = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
MIB = 1024  # KiB


def texts(*items: str) -> list[common_pb2.Input]:
    return [common_pb2.Input(text=t) for t in items]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A server at its default limits, with an API key and the probe port."""
    directory = tmp_path_factory.mktemp("hostile")
    (directory / "key").write_text(KEY + "\n")
    metrics = free_port()
    srv = ServerProcess(directory / "server.log", "--api-key-file", str(directory / "key"),
                        "--metrics-port", str(metrics)).wait_ready()
    srv.metrics_port = metrics
    yield srv
    assert srv.terminate() == 0, srv.log()


@pytest.fixture(scope="module")
def channel(guarded):
    with grpc.insecure_channel(guarded.address, options=BIG) as ch:
        yield ch


def status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


# --- 1. prompts count, and so does the whole request ----------------------------------------------

def test_prompts_count_against_the_character_limits(guarded, channel):
    embed = embed_pb2_grpc.EmbedServiceStub(channel).Embed
    before = rss_kib(guarded.proc.pid)
    bomb = embed_pb2.EmbedRequest(prompt="word " * 80000, inputs=texts("x") * 2048,
                                  truncation=TRUNCATE)  # ~400 KiB that used to cost GiBs
    code, details = status(lambda: embed(bomb, metadata=AUTH, timeout=60))
    assert code == EXHAUSTED and "input 0 with its prompt has 400001 characters" in details
    assert "--max-chars-per-input" in details
    wide = embed_pb2.EmbedRequest(prompt="p" * 1000, inputs=texts("t" * 1000) * 2048,
                                  truncation=TRUNCATE)
    code, details = status(lambda: embed(wide, metadata=AUTH, timeout=60))
    assert code == EXHAUSTED and "--max-chars-per-request" in details
    tokenize = model_pb2_grpc.ModelServiceStub(channel).Tokenize
    code, details = status(lambda: tokenize(model_pb2.TokenizeRequest(
        prompt="word " * 80000, texts=["x"] * 100), metadata=AUTH, timeout=60))
    assert code == EXHAUSTED and "with its prompt" in details
    ids = common_pb2.Input(tokens=common_pb2.TokenIds(ids=[1000] * 1000))
    code, details = status(lambda: embed(embed_pb2.EmbedRequest(inputs=[ids] * 2048),
                                         metadata=AUTH, timeout=60))
    assert code == EXHAUSTED and "token ids in all" in details
    # refused before tokenizing: no memory to speak of
    assert rss_kib(guarded.proc.pid) - before <= 64 * MIB


# --- 2. nothing is decoded before authentication and the size checks ------------------------------

def test_big_messages_cost_their_bytes_not_their_objects(guarded, channel):
    """15 MiB of three million tiny inputs: unauthenticated, refused without being decoded;
    authenticated, refused by count before any input is converted."""
    embed = embed_pb2_grpc.EmbedServiceStub(channel).Embed
    flood = embed_pb2.EmbedRequest(inputs=texts("x") * 3_000_000).SerializeToString()
    raw = channel.unary_unary("/poolsvc.v1.EmbedService/Embed", request_serializer=None,
                              response_deserializer=embed_pb2.EmbedResponse.FromString)
    before = rss_kib(guarded.proc.pid)
    outcomes = []

    def unauthenticated():
        with pytest.raises(grpc.RpcError) as err:
            raw(flood, timeout=120)
        outcomes.append(err.value.code())

    callers = [threading.Thread(target=unauthenticated) for _ in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert outcomes == [grpc.StatusCode.UNAUTHENTICATED] * 4
    code, details = status(lambda: raw(flood, metadata=AUTH, timeout=120))
    assert code == EXHAUSTED and "3000000 inputs" in details
    code, details = status(lambda: embed(embed_pb2.EmbedRequest(
        inputs=texts("x" * 1000) * 17_000), metadata=AUTH, timeout=120))  # over 16 MiB
    assert code == EXHAUSTED
    # five 15 MiB messages: each costs about its bytes while it is handled, never GiBs
    assert rss_kib(guarded.proc.pid) - before <= 256 * MIB


# --- 3. a response known to be too large is refused before it is computed -------------------------

def in_process(**changes):
    """An in-process server (its engine's counters readable), started and stopped around use."""

    class Running:
        async def __aenter__(self):
            self.server = PoolServer(ServerConfig(port=0, threads=2, **changes))
            await self.server.start()
            self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.server.port}",
                                                     options=BIG)
            return self

        async def __aexit__(self, *exc):
            await self.channel.close()
            await self.server.stop()

    return Running()


def test_a_response_over_the_limit_is_refused_before_it_is_computed():
    async def scenario():
        async with in_process() as running:
            encode = encode_pb2_grpc.EncodeServiceStub(running.channel).Encode
            before = running.server.engine.stats["sequences"]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await encode(encode_pb2.EncodeRequest(
                    inputs=texts(DENSE) * 2048, task=common_pb2.TASK_TOKEN_EMBED,
                    truncation=TRUNCATE), timeout=120)
            assert err.value.code() == EXHAUSTED
            assert "the response would be 768.1 MiB" in err.value.details()
            assert "--max-message-bytes" in err.value.details()
            assert running.server.engine.stats["sequences"] == before  # nothing computed
            reply = await encode(encode_pb2.EncodeRequest(  # within the limit: answered
                inputs=texts(PASSAGE) * 4, task=common_pb2.TASK_TOKEN_EMBED,
                truncation=TRUNCATE, output_dtype=2), timeout=120)
            assert len(reply.outputs) == 4

    asyncio.run(scenario())


# --- 4. a stream whose client does not read is no longer read -------------------------------------

def test_a_stream_that_is_not_read_stops_being_read():
    """--max-stream-inflight bounds answers computed but not sent, too: a client that writes
    and never reads gets at most that many computed, plus what the transport holds (gRPC's
    flow-control window and the sockets' buffers: a few MiB, here ten 400 KB answers at most)."""
    inputs = 256

    async def scenario():
        async with in_process(max_stream_inflight=4) as running:
            stats = running.server.engine.stats
            call = embed_pb2_grpc.EmbedServiceStub(running.channel).EmbedStream(timeout=300)

            async def write():  # blocks in flow control once the server stops reading
                for i in range(40):
                    await call.write(embed_pb2.EmbedStreamRequest(id=str(i), request=embed_pb2.
                                     EmbedRequest(inputs=texts(f"short item {i}") * inputs)))
                await call.done_writing()

            writer = asyncio.create_task(write())
            while running.server.engine.stats["sequences"] < 4 * inputs:
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # a server that kept reading would compute far more
            computed = running.server.engine.stats["sequences"] - stats["sequences"]
            assert computed <= (4 + 10) * inputs, computed // inputs
            answered = {reply.id async for reply in call}
            await writer
            assert answered == {str(i) for i in range(40)}

    asyncio.run(scenario())


# --- 5. load is shed at once, by count and by queued work -----------------------------------------

def test_overload_is_refused_before_any_work():
    """With 4 admitted, the other 60 of 64 concurrent 16-passage calls are refused on arrival:
    every refusal comes back before the first admitted call is answered. (Queued work is not
    limited here: this is the request count alone.)"""

    async def scenario():
        async with in_process(max_concurrent_requests=4, max_queue_seconds=1e6) as running:
            embed = embed_pb2_grpc.EmbedServiceStub(running.channel).Embed
            finished: list[tuple[float, grpc.StatusCode]] = []

            async def call(i):
                request = embed_pb2.EmbedRequest(inputs=texts(f"{i} {PASSAGE}") * 16,
                                                 truncation=TRUNCATE)
                try:
                    await embed(request, timeout=300)
                    finished.append((time.monotonic(), grpc.StatusCode.OK))
                except grpc.aio.AioRpcError as err:
                    finished.append((time.monotonic(), err.code()))

            await asyncio.gather(*(call(i) for i in range(64)))
            refused = [t for t, code in finished if code == EXHAUSTED]
            answered = [t for t, code in finished if code == grpc.StatusCode.OK]
            assert len(answered) >= 4 and len(refused) + len(answered) == 64
            assert max(refused) < min(answered)

    asyncio.run(scenario())


def test_load_is_shed_by_the_seconds_of_work_queued():
    async def scenario():
        async with in_process(max_queue_seconds=1.0) as running:
            embed = embed_pb2_grpc.EmbedServiceStub(running.channel).Embed
            outcomes = await asyncio.gather(*(embed(embed_pb2.EmbedRequest(
                inputs=texts(f"{i} {PASSAGE}") * 2, truncation=TRUNCATE), timeout=300)
                for i in range(64)), return_exceptions=True)
            shed = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
            assert shed and all(o.code() == EXHAUSTED and "--max-queue-seconds" in o.details()
                                for o in shed)
            assert any(isinstance(o, embed_pb2.EmbedResponse) for o in outcomes)

    asyncio.run(scenario())


# --- 6. the event loop only admits, awaits and answers --------------------------------------------

def test_big_requests_do_not_stall_the_event_loop():
    """Decoding, converting and tokenizing run in the worker pool: while the largest legal
    requests are handled, the loop answers health checks within Kubernetes' 1 s probe timeout."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def scenario():
        async with in_process() as running:
            embed = embed_pb2_grpc.EmbedServiceStub(running.channel).Embed
            health = health_pb2_grpc.HealthStub(running.channel)
            ids = common_pb2.Input(tokens=common_pb2.TokenIds(ids=list(range(1000, 1976))))
            short = common_pb2.TruncationOptions(max_tokens=16)  # heavy to decode, cheap to run
            heavy = [embed_pb2.EmbedRequest(inputs=texts("y " * 48_500) * 20, truncation=short),
                     embed_pb2.EmbedRequest(inputs=[ids] * 2048, truncation=short)]
            lags = []

            async def ticker():
                while True:
                    started = time.monotonic()
                    await asyncio.sleep(0.01)
                    lags.append(time.monotonic() - started - 0.01)

            tick = asyncio.create_task(ticker())
            calls = [asyncio.ensure_future(embed(r, timeout=300)) for r in heavy * 2]
            checks = 0
            while not all(c.done() for c in calls):
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                checks += 1
                await asyncio.sleep(0.1)
            tick.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            assert checks > 0 and max(lags) < 1.0, max(lags)

    asyncio.run(scenario())


def test_small_calls_are_prepared_on_the_loop_big_ones_in_the_pool():
    """A call of at most admitted.INLINE_BYTES is tokenized on the event loop (tens of
    microseconds, less than the pool's hop); a bigger one waits for a pool worker. With every
    worker busy, small calls, their bad input included, are still answered, and a big call is
    answered once a worker is free."""
    from poolsvc.service.admitted import INLINE_BYTES

    async def scenario():
        async with in_process(tokenizer_workers=1) as running:
            embed = embed_pb2_grpc.EmbedServiceStub(running.channel).Embed
            release = threading.Event()
            blocker = running.server.pool.submit(release.wait)
            try:
                small = await embed(embed_pb2.EmbedRequest(inputs=texts("a short query")),
                                    timeout=60)
                assert list(small.embeddings.shape) == [1, 384]
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await embed(embed_pb2.EmbedRequest(), timeout=60)  # no inputs
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
                assert "at least one" in err.value.details()
                request = embed_pb2.EmbedRequest(inputs=texts("word " * 400),
                                                 truncation=TRUNCATE)
                assert request.ByteSize() > INLINE_BYTES
                big = asyncio.ensure_future(embed(request, timeout=60))
                # a small call made after the big one is answered while the big one waits
                after = await embed(embed_pb2.EmbedRequest(inputs=texts("another one")),
                                    timeout=60)
                assert list(after.embeddings.shape) == [1, 384]
                assert not big.done()
            finally:
                release.set()
            assert list((await big).embeddings.shape) == [1, 384]
            blocker.result()

    asyncio.run(scenario())


# --- 7, 8. bad items and bad bytes ---------------------------------------------------------------

def stream_item(i, text="fine", inputs=1) -> bytes:
    return embed_pb2.EmbedStreamRequest(id=str(i), request=embed_pb2.EmbedRequest(
        inputs=texts(f"{text} {i}") * inputs)).SerializeToString()


def test_a_bad_stream_item_gets_its_own_answer(channel, llm):
    """10 valid items, one with invalid UTF-8, one over the input limit, one over the message
    limit, 5 more valid: every valid item is answered, each bad one gets its error."""
    bad_utf8 = stream_item("bad-utf8", "PLACEHOLDER").replace(b"PLACEHOLDER", b"\xff\xfe\xfd" * 3
                                                               + b"xx")
    items = [stream_item(i) for i in range(10)] + [
        bad_utf8, stream_item("too-many", inputs=3000),
        embed_pb2.EmbedStreamRequest(id="too-big", request=embed_pb2.EmbedRequest(
            inputs=texts("z" * 1000) * 16_900)).SerializeToString(),  # over 16 MiB
    ] + [stream_item(i) for i in range(10, 15)]
    stream = channel.stream_stream("/poolsvc.v1.EmbedService/EmbedStream",
                                   request_serializer=None,
                                   response_deserializer=embed_pb2.EmbedStreamResponse.FromString)
    replies = {r.id: r for r in stream(iter(items), metadata=AUTH, timeout=300)}
    assert len(replies) == 18
    errors = {k: r.error.message for k, r in replies.items() if r.WhichOneof("result") == "error"}
    assert set(errors) == {"bad-utf8", "too-many", "too-big"}, errors
    for i in range(15):
        got = decode_tensor(replies[str(i)].response.embeddings)
        want = np.array(llm.embed(f"fine {i}")[0].outputs.embedding)
        assert np.abs(got[0] - want).max() <= 1e-5
    assert replies["bad-utf8"].error.code == INVALID.value[0]
    assert "not a valid poolsvc.v1.EmbedStreamRequest" in replies["bad-utf8"].error.message
    assert replies["too-many"].error.code == EXHAUSTED.value[0]
    assert replies["too-big"].error.code == EXHAUSTED.value[0]
    assert "--max-message-bytes" in replies["too-big"].error.message


@pytest.mark.parametrize("method,response", [
    ("/poolsvc.v1.EmbedService/Embed", embed_pb2.EmbedResponse),
    ("/poolsvc.v1.ModelService/Tokenize", model_pb2.TokenizeResponse),
    ("/poolsvc.v1.ModelService/GetModelInfo", model_pb2.GetModelInfoResponse),
])
def test_malformed_protobuf_is_invalid_argument(channel, method, response):
    call = channel.unary_unary(method, request_serializer=None,
                               response_deserializer=response.FromString)
    for garbage in (b"\xff\xff\xff\xff", b"\x0a\x05\xff\xfe\xfd\xfc\xfb", b"\x12\x80"):
        code, details = status(lambda g=garbage: call(g, metadata=AUTH, timeout=30))
        assert code == INVALID and "is not a valid poolsvc.v1." in details, details


# --- 9. messages quote a bounded part of what was sent --------------------------------------------

def test_error_messages_quote_a_bounded_part_of_the_input(channel):
    embed = embed_pb2_grpc.EmbedServiceStub(channel).Embed
    code, details = status(lambda: embed(embed_pb2.EmbedRequest(
        model="m" * 2_000_000, inputs=texts("x")), metadata=AUTH, timeout=60))
    assert code == grpc.StatusCode.NOT_FOUND and "(2000000 characters)" in details
    assert len(details) <= 1024
    code, details = status(lambda: embed(embed_pb2.EmbedRequest(
        prompt_name="q" * 2_000_000, inputs=texts("x")), metadata=AUTH, timeout=60))
    assert code == INVALID and "unknown prompt_name" in details and len(details) <= 1024


# --- 10. the probe port ---------------------------------------------------------------------------

def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads"))


def test_the_probe_port_bounds_its_connections(guarded):
    url = f"http://127.0.0.1:{guarded.metrics_port}/healthz"
    head = urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10)
    assert head.status == 200 and head.read() == b""
    assert "Python" not in head.headers.get("Server", "")
    before = threads(guarded.proc.pid)
    sockets = []
    for _ in range(300):  # half-sent requests that never finish
        s = socket.create_connection(("127.0.0.1", guarded.metrics_port))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        sockets.append(s)
    time.sleep(0.5)
    assert threads(guarded.proc.pid) <= before + 16
    for s in sockets:
        s.close()
    for _ in range(100):  # the slots come back as the connections go
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                assert reply.status == 200
                break
        except OSError:
            time.sleep(0.1)
    else:
        pytest.fail("the probe port did not recover")


# --- 11. a cancelled stream leaves nothing behind -------------------------------------------------

def test_cancelled_streams_log_no_errors(guarded, channel):
    stub = embed_pb2_grpc.EmbedServiceStub(channel)
    for _ in range(5):
        items = (embed_pb2.EmbedStreamRequest(id=str(i), request=embed_pb2.EmbedRequest(
            inputs=texts(PASSAGE) * 8, truncation=TRUNCATE)) for i in range(1000))
        call = stub.EmbedStream(items, metadata=AUTH, timeout=300)
        next(call)
        call.cancel()
    # the server is still fine, and said nothing alarming about the cancelled streams. On a
    # loaded machine the cancelled streams' queued work may still be draining: the server then
    # sheds with RESOURCE_EXHAUSTED ("retry with backoff"), which is what a client does here.
    for attempt in range(30):
        try:
            reply = stub.Embed(embed_pb2.EmbedRequest(inputs=texts("still here")),
                               metadata=AUTH, timeout=60)
            break
        except grpc.RpcError as err:
            if err.code() != EXHAUSTED or attempt == 29:
                raise
            time.sleep(2)
    assert list(reply.embeddings.shape) == [1, 384]
    log = guarded.log()
    assert "Task was destroyed" not in log and " ERROR " not in log, log[-3000:]


# --- 12. pickles and keys -------------------------------------------------------------------------

class NotATensor:  # a class torch's weights-only unpickler refuses
    pass


def test_a_pickle_with_objects_is_refused_with_the_usual_message(tmp_path, minilm_path):
    from safetensors.torch import load_file

    directory = tiny_bert(tmp_path / "bert", minilm_path)
    state = dict(load_file(str(directory / "model.safetensors")))
    state["evil"] = NotATensor()
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")
    done = subprocess.run([sys.executable, "-m", "poolsvc", "serve", "--port", "0",
                           "--allow-pickle-weights", "--model", str(directory)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1, done.stderr
    assert "cannot serve" in done.stderr and "holds more than tensors" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_api_key_can_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("POOLSVC_API_KEY", KEY)
    srv = ServerProcess(tmp_path / "server.log").wait_ready()
    try:
        with open(f"/proc/{srv.proc.pid}/cmdline", "rb") as f:
            assert KEY.encode() not in f.read()
        with grpc.insecure_channel(srv.address) as ch:
            embed = embed_pb2_grpc.EmbedServiceStub(ch).Embed
            request = embed_pb2.EmbedRequest(inputs=texts("x"))
            code, _ = status(lambda: embed(request, timeout=60))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert list(embed(request, metadata=AUTH, timeout=60).embeddings.shape) == [1, 384]
    finally:
        assert srv.terminate() == 0


# --- the flood: all of the above at once, with normal callers beside it -------------------------

def test_hostile_load_leaves_the_server_serving_correct_and_bounded(guarded, reference):
    """Unauthenticated and authenticated floods of the worst requests, while normal callers
    run: afterwards the server is SERVING, every normal answer was right, and its RSS stayed
    under 2 GiB (half the CPU Deployment's 4 GiB limit)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    flood = embed_pb2.EmbedRequest(inputs=texts("x") * 3_000_000).SerializeToString()
    worst = [
        ("/poolsvc.v1.EmbedService/Embed", flood, None),
        ("/poolsvc.v1.EmbedService/Embed", flood, AUTH),
        ("/poolsvc.v1.EmbedService/Embed", embed_pb2.EmbedRequest(
            prompt="word " * 80000, inputs=texts("x") * 2048).SerializeToString(), AUTH),
        ("/poolsvc.v1.EncodeService/Encode", encode_pb2.EncodeRequest(
            inputs=texts(DENSE) * 2048, task=common_pb2.TASK_TOKEN_EMBED,
            truncation=TRUNCATE).SerializeToString(), AUTH),
        ("/poolsvc.v1.EmbedService/Embed", b"\xff\xff\xff\xff", AUTH),
        ("/poolsvc.v1.EmbedService/Embed", embed_pb2.EmbedRequest(
            model="m" * 1_000_000, inputs=texts("x")).SerializeToString(), AUTH),
    ]
    stop = threading.Event()
    peak = [rss_kib(guarded.proc.pid)]
    unexpected: list[str] = []

    def attacker(seed: int):
        with grpc.insecure_channel(guarded.address, options=BIG) as ch:
            i = seed
            while not stop.is_set():
                method, payload, metadata = worst[i % len(worst)]
                i += 1
                call = ch.unary_unary(method, request_serializer=None,
                                      response_deserializer=None)
                try:
                    call(payload, metadata=metadata, timeout=120)
                    unexpected.append(f"{method} succeeded")
                except grpc.RpcError as err:
                    if err.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                        unexpected.append(f"{method}: {err.code()} {err.details()}")
                peak.append(rss_kib(guarded.proc.pid))

    attackers = [threading.Thread(target=attacker, args=(seed,)) for seed in range(4)]
    for t in attackers:
        t.start()
    try:
        normal = Load(guarded.address, reference, callers=16, metadata=AUTH)
        asyncio.run(normal.run(120))
    finally:
        stop.set()
        for t in attackers:
            t.join()
    assert unexpected == []
    assert normal.failures == [] and normal.wrong == 0 and normal.ok >= 120
    with grpc.insecure_channel(guarded.address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert max(peak) <= 2048 * MIB, f"peak RSS {max(peak) // MIB} MiB"


@pytest.fixture(scope="module")
def reference(llm):
    return {t: np.array(o.outputs.embedding, dtype=np.float32)
            for t, o in zip(POOL, llm.embed(POOL))}
