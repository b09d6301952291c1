"""The Python client (sync and asyncio) against the live server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import TEXTS
from poolsvc_client import AsyncClient, Client, StreamItemError


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
