"""The Python client (sync and asyncio) against live servers: every RPC, checked against the raw
stubs and reference models, and its errors."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from conftest import TEXTS
from poolsvc_client import (
    AsyncClient,
    Client,
    PoolsvcError,
    StreamItemError,
    channel_options,
    decode_tensor,
)

from poolsvc.gen.v1 import embed_pb2, embed_pb2_grpc


def test_sync_client(server, st_model):
    want = st_model.encode(TEXTS, convert_to_numpy=True)
    with Client(server.address) as client:
        assert client.health() == "SERVING"
        assert client.health("poolsvc.v1.EmbedService") == "SERVING"
        (info,) = client.list_models()
        assert (info.name, info.dimensions, info.max_input_tokens) == ("all-MiniLM-L6-v2", 384,
                                                                       256)
        assert list(info.aliases) == ["sentence-transformers/all-MiniLM-L6-v2"]
        np.testing.assert_allclose(client.embed(TEXTS), want, atol=2e-6)
        np.testing.assert_allclose(client.embed(TEXTS, dtype="bfloat16"), want, atol=8e-3)
        assert client.embed("one", dimensions=32).shape == (1, 32)
        ids = client.tokenize(["Hello, my name is"])
        assert ids == [[101, 7592, 1010, 2026, 2171, 2003, 102]]
        np.testing.assert_allclose(client.embed(ids), want[:1], atol=2e-6)
        got = dict(client.embed_stream([TEXTS[:3], TEXTS[3:]]))
        np.testing.assert_allclose(np.concatenate([got[0], got[1]]), want, atol=2e-6)
        with pytest.raises(StreamItemError, match="batch 1: INVALID_ARGUMENT"):
            dict(client.embed_stream([TEXTS[:1], []]))


def test_async_client(server, st_model):
    want = st_model.encode(TEXTS, convert_to_numpy=True)

    async def scenario():
        async with AsyncClient(server.address) as client:
            assert await client.health() == "SERVING"
            results = await asyncio.gather(*(client.embed([t]) for t in TEXTS))
            np.testing.assert_allclose(np.concatenate(results), want, atol=2e-6)
            streamed = {i: v async for i, v in client.embed_stream([[t] for t in TEXTS])}
            np.testing.assert_allclose(np.concatenate([streamed[i] for i in range(len(TEXTS))]),
                                       want, atol=2e-6)
            assert (await client.tokenize(["x"])) == [[101, 1060, 102]]

    asyncio.run(scenario())


def test_errors_are_typed(server):
    with Client(server.address) as client:
        with pytest.raises(PoolsvcError) as info:
            client.embed("x", model="nope")
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert "'nope' is not served" in info.value.details
        assert str(info.value).startswith("NOT_FOUND: ")
        with pytest.raises(PoolsvcError) as info:
            client.classify("x")  # the default model embeds only
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        # hints name the option as this client spells it, not as the request message does
        with pytest.raises(PoolsvcError) as info:
            client.embed("word " * 400)
        assert "enable truncation (truncate=True)" in info.value.details
        assert "truncation.enabled" not in info.value.details
        with pytest.raises(PoolsvcError) as info:
            client.embed("x", truncate=1000)
        assert "(truncate=<number of tokens>)" in info.value.details
        with pytest.raises(PoolsvcError) as info:  # int8 quantizes normalized vectors only
            client.embed("x", dtype="int8", normalize=False)
        assert "quantization_range" in info.value.details
        with pytest.raises(ValueError, match=r"unknown dtype='f32'; use one of 'float32'"):
            client.embed("x", dtype="f32")
        with pytest.raises(ValueError, match=r"unknown truncation_side='middle'"):
            client.embed("x", truncate=True, truncation_side="middle")
        with pytest.raises(ValueError, match=r"unknown task='score'; use one of 'token_embed'"):
            client.encode("x", task="score")
        with pytest.raises(ValueError, match="unknown dtype"):  # before anything is sent
            client.embed_stream([["x"]], dtype="int16")
        with pytest.raises(TypeError, match="an input is a str"):
            client.embed([1.5])
        items = dict(client.embed_stream([["a"], [], ["b"]], return_errors=True))
        assert items[0].shape == items[2].shape == (1, 384)
        assert isinstance(items[1], StreamItemError) and items[1].index == 1
        assert items[1].code == grpc.StatusCode.INVALID_ARGUMENT


def raw(channel, stub, method, request):
    return getattr(stub(channel), method)(request, timeout=60)


def test_every_rpc_matches_the_raw_stubs(examples_server):
    from poolsvc.gen.v1 import (
        classify_pb2,
        classify_pb2_grpc,
        common_pb2,
        encode_pb2,
        encode_pb2_grpc,
        score_pb2,
        score_pb2_grpc,
    )

    def inputs(texts):
        return [common_pb2.Input(text=t) for t in texts]

    query, docs = "What is the capital of France?", ["Cats purr.", "Paris is in France.", "Dogs."]
    with grpc.insecure_channel(examples_server.address) as channel, \
            Client(examples_server.address) as client:
        want = raw(channel, classify_pb2_grpc.ClassifyServiceStub, "Classify",
                   classify_pb2.ClassifyRequest(model="clf", inputs=inputs(TEXTS[:3])))
        got = client.classify(TEXTS[:3], model="clf")
        np.testing.assert_array_equal(got.probs, decode_tensor(want.probs))
        assert got.labels == ["negative", "neutral", "positive"] == list(want.labels)
        assert got.predicted == [got.labels[i] for i in got.probs.argmax(1)]

        for activation in (None, False):
            request = score_pb2.ScoreRequest(model="rerank", queries=inputs([query]),
                                             documents=inputs(docs))
            if activation is not None:
                request.activation = activation
            want = decode_tensor(raw(channel, score_pb2_grpc.ScoreServiceStub, "Score",
                                     request).scores)
            np.testing.assert_array_equal(
                client.score(query, docs, model="rerank", activation=activation), want)
        scores = client.score(query, docs, model="rerank")
        ranked = client.rerank(query, docs, model="rerank", top_n=2, return_documents=True)
        assert [r.index for r in ranked] == list(np.argsort(scores)[::-1][:2])
        np.testing.assert_allclose([r.score for r in ranked], np.sort(scores)[::-1][:2], atol=1e-6)
        assert [r.document for r in ranked] == [docs[r.index] for r in ranked]
        assert all(r.document == "" for r in client.rerank(query, docs, model="rerank"))

        vectors = client.embed([query, *docs])  # normalized: cosine = dot product
        np.testing.assert_allclose(client.score(query, docs), vectors[1:] @ vectors[0], atol=1e-5)

        want = raw(channel, encode_pb2_grpc.EncodeServiceStub, "Encode",
                   encode_pb2.EncodeRequest(inputs=inputs(TEXTS[:2])))
        got = client.encode(TEXTS[:2])
        for g, w, ids in zip(got, want.outputs, client.tokenize(TEXTS[:2])):
            np.testing.assert_array_equal(g, decode_tensor(w))
            assert g.shape == (len(ids), 384)
        (reward,) = client.encode("Step 1: 2 + 2 = 4.", model="rm")
        assert reward.shape == (len(client.tokenize("Step 1: 2 + 2 = 4.", model="rm")[0]), 1)

        assert client.model_info("clf").labels == ["negative", "neutral", "positive"]
        assert client.model_info().name == "all-MiniLM-L6-v2"
        assert client.tokenize("x", add_special_tokens=False) == [[1060]]

        from tiny_models import image_bytes
        image = image_bytes(40, 30, "JPEG")
        pair = client.embed([image, "a photo of a cat"], model="clip")
        assert pair.shape == (2, 24)
        assert client.score(image, "a photo of a cat", model="clip").shape == (1,)

        got = dict(client.classify_stream([TEXTS[:2], TEXTS[2:4]], model="clf"))
        np.testing.assert_allclose(got[1].probs, client.classify(TEXTS[2:4], model="clf").probs,
                                   atol=1e-6)
        got = dict(client.score_stream([(query, docs), (docs, query)], model="rerank"))
        np.testing.assert_allclose(got[0], scores, atol=1e-6)
        assert got[1].shape == (3,)
        got = dict(client.encode_stream([TEXTS[:1], TEXTS[1:2]]))
        np.testing.assert_allclose(got[1][0], client.encode(TEXTS[1:2])[0], atol=1e-6)


def test_async_client_has_every_method(examples_server):
    async def scenario():
        async with AsyncClient(examples_server.address) as client:
            with Client(examples_server.address) as sync:
                np.testing.assert_array_equal((await client.classify("x", model="clf")).probs,
                                              sync.classify("x", model="clf").probs)
                assert await client.rerank("q", ["a", "b"], model="rerank") == \
                    sync.rerank("q", ["a", "b"], model="rerank")
                np.testing.assert_array_equal(await client.score("q", ["a"], model="rerank"),
                                              sync.score("q", ["a"], model="rerank"))
                (tokens,) = await client.encode("x")
                assert tokens.shape == (3, 384)
                assert [m.name for m in await client.list_models()] == \
                    [m.name for m in sync.list_models()]
                assert (await client.model_info("rm")).name == "rm"

            async def pairs():  # streams take async iterables too
                for docs in (["a"], ["a", "b"]):
                    yield "q", docs
            got = {i: s async for i, s in client.score_stream(pairs(), model="rerank")}
            assert got[0].shape == (1,) and got[1].shape == (2,)
            got = {i: c async for i, c in client.classify_stream([["x"]], model="clf")}
            assert got[0].probs.shape == (1, 3)
            got = {i: e async for i, e in client.encode_stream([["x"], ["y z"]])}
            assert got[1][0].shape == (4, 384)
            with pytest.raises(PoolsvcError) as info:
                await client.embed("x", model="nope")
            assert info.value.code == grpc.StatusCode.NOT_FOUND

    asyncio.run(scenario())


def test_service_config_retries_what_a_closing_server_answers():
    """The clients' service config retries UNAVAILABLE and the CANCELLED that gRPC's core answers
    for a call reaching a closing port (grpc/grpc#41785); a call the client cancels is not
    retried."""
    attempts = []

    class Closing(embed_pb2_grpc.EmbedServiceServicer):
        async def Embed(self, request, context):
            attempts.append(request.model)
            if len(attempts) == 1:
                await context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
            if len(attempts) == 2:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
            if request.model == "slow":
                await asyncio.sleep(30)
            return embed_pb2.EmbedResponse(model=request.model)

    async def main():
        server = grpc.aio.server()
        embed_pb2_grpc.add_EmbedServiceServicer_to_server(Closing(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                                 options=channel_options()) as channel:
                stub = embed_pb2_grpc.EmbedServiceStub(channel)
                reply = await stub.Embed(embed_pb2.EmbedRequest(model="m"))
                assert reply.model == "m" and len(attempts) == 3
                call = stub.Embed(embed_pb2.EmbedRequest(model="slow"))
                while len(attempts) < 4:
                    await asyncio.sleep(0.01)
                call.cancel()
                try:
                    await call
                except asyncio.CancelledError:
                    pass
                await asyncio.sleep(0.2)
                assert len(attempts) == 4  # not retried
        finally:
            await server.stop(0)

    asyncio.run(main())
