"""Sync and asyncio clients over the generated stubs."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from importlib import resources

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from poolsvc.gen.v1 import (
    common_pb2,
    embed_pb2,
    embed_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
    tensor_pb2,
)
from poolsvc_client.tensors import decode_tensor

_DTYPES = {"float32": tensor_pb2.DATA_TYPE_FLOAT32, "float16": tensor_pb2.DATA_TYPE_FLOAT16,
           "bfloat16": tensor_pb2.DATA_TYPE_BFLOAT16}
_SIDES = {"right": common_pb2.TRUNCATION_SIDE_RIGHT, "left": common_pb2.TRUNCATION_SIDE_LEFT}

Text = str | bytes | Sequence[int]  # a text, an encoded image (PNG, JPEG, WebP), or token ids


def _input(item: Text) -> common_pb2.Input:
    if isinstance(item, str):
        return common_pb2.Input(text=item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return common_pb2.Input(image=common_pb2.Image(data=bytes(item)))
    return common_pb2.Input(tokens=common_pb2.TokenIds(ids=list(item)))


def build_embed_request(texts: Text | Sequence[Text], *, model: str = "",
                        normalize: bool | None = None, dimensions: int | None = None,
                        truncate: bool | int | None = None, truncation_side: str = "right",
                        dtype: str = "float32", prompt_name: str = "",
                        prompt: str = "") -> embed_pb2.EmbedRequest:
    """`truncate`: None = server default, False = reject over-long inputs, True = cut at the
    model's limit, an int = cut at that many tokens."""
    if isinstance(texts, str):
        texts = [texts]
    request = embed_pb2.EmbedRequest(model=model, inputs=[_input(t) for t in texts],
                                     output_dtype=_DTYPES[dtype], prompt_name=prompt_name,
                                     prompt=prompt)
    if normalize is not None:
        request.normalize = normalize
    if dimensions is not None:
        request.dimensions = dimensions
    if truncate is not None or truncation_side != "right":
        request.truncation.side = _SIDES[truncation_side]
        if isinstance(truncate, bool):
            request.truncation.enabled = truncate
        elif truncate is not None:
            request.truncation.max_tokens = truncate
    return request


SERVICE_CONFIG = (resources.files("poolsvc_client") / "service_config.json").read_text()


def channel_options(max_message_bytes: int = 64 << 20) -> list[tuple[str, object]]:
    """The documented service config (round_robin over every address the name resolves to, and
    retries of UNAVAILABLE, which a draining or restarting replica answers), plus message size."""
    return [("grpc.service_config", SERVICE_CONFIG), ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def _credentials(root_ca: str | None, cert: str | None, key: str | None):
    def read(path):
        with open(path, "rb") as f:
            return f.read()
    return grpc.ssl_channel_credentials(root_certificates=read(root_ca) if root_ca else None,
                                        private_key=read(key) if key else None,
                                        certificate_chain=read(cert) if cert else None)


def make_channel(target: str, *, tls: bool = False, root_ca: str | None = None,
                 cert: str | None = None, key: str | None = None, aio: bool = False):
    """A channel to poolsvc: plaintext, or TLS (`tls`, or any of the PEM paths: `root_ca` to
    trust, `cert`/`key` to present for mutual TLS)."""
    module = grpc.aio if aio else grpc
    if tls or root_ca or cert:
        return module.secure_channel(target, _credentials(root_ca, cert, key), channel_options())
    return module.insecure_channel(target, channel_options())


class _Stubs:
    def __init__(self, channel, api_key: str | None, timeout: float | None):
        self.channel = channel
        self.timeout = timeout
        # sent with every call; plaintext too, so local and sidecar-TLS set-ups work alike
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.call_options = {"timeout": timeout, "metadata": self.metadata}
        self.embed_stub = embed_pb2_grpc.EmbedServiceStub(channel)
        self.model_stub = model_pb2_grpc.ModelServiceStub(channel)
        self.health_stub = health_pb2_grpc.HealthStub(channel)


class Client(_Stubs):
    """Blocking client. `target` is host:port (or any gRPC name, e.g. dns:///poolsvc:50051 for
    round-robin over a headless service). TLS options as make_channel; `api_key` is sent as a
    bearer token; or pass your own `channel`."""

    def __init__(self, target: str = "127.0.0.1:50051", *, channel: grpc.Channel | None = None,
                 timeout: float | None = 60.0, api_key: str | None = None, tls: bool = False,
                 root_ca: str | None = None, cert: str | None = None, key: str | None = None):
        super().__init__(channel or make_channel(target, tls=tls, root_ca=root_ca, cert=cert,
                                                 key=key), api_key, timeout)

    def embed(self, texts: Text | Sequence[Text], **options) -> np.ndarray:
        """[N, D] embeddings; options as build_embed_request."""
        return decode_tensor(self.embed_response(texts, **options).embeddings)

    def embed_response(self, texts, **options) -> embed_pb2.EmbedResponse:
        return self.embed_stub.Embed(build_embed_request(texts, **options), **self.call_options)

    def embed_stream(self, batches: Iterable[Text | Sequence[Text]],
                     **options) -> Iterator[tuple[int, np.ndarray]]:
        """Embeds many batches on one stream; yields (batch index, [N, D]) as they finish, which
        may be out of order. A failed batch raises StreamItemError; the others are unaffected."""
        counter = itertools.count()
        requests = (embed_pb2.EmbedStreamRequest(id=str(next(counter)),
                                                 request=build_embed_request(b, **options))
                    for b in batches)
        for response in self.embed_stub.EmbedStream(requests, **self.call_options):
            yield _stream_item(response)

    def tokenize(self, texts: Sequence[str], *, model: str = "") -> list[list[int]]:
        response = self.model_stub.Tokenize(model_pb2.TokenizeRequest(model=model, texts=texts),
                                        **self.call_options)
        return [list(r.ids) for r in response.results]

    def list_models(self) -> list[model_pb2.ModelInfo]:
        return list(self.model_stub.ListModels(model_pb2.ListModelsRequest(),
                                           **self.call_options).models)

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, ... for the server ("") or one service."""
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                     **self.call_options)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Stubs):
    """asyncio client with Client's options; create it inside a running event loop."""

    def __init__(self, target: str = "127.0.0.1:50051", *,
                 channel: grpc.aio.Channel | None = None, timeout: float | None = 60.0,
                 api_key: str | None = None, tls: bool = False, root_ca: str | None = None,
                 cert: str | None = None, key: str | None = None):
        super().__init__(channel or make_channel(target, tls=tls, root_ca=root_ca, cert=cert,
                                                 key=key, aio=True), api_key, timeout)

    async def embed(self, texts: Text | Sequence[Text], **options) -> np.ndarray:
        return decode_tensor((await self.embed_response(texts, **options)).embeddings)

    async def embed_response(self, texts, **options) -> embed_pb2.EmbedResponse:
        request = build_embed_request(texts, **options)
        return await self.embed_stub.Embed(request, **self.call_options)

    async def embed_stream(self, batches: AsyncIterable | Iterable,
                           **options) -> AsyncIterator[tuple[int, np.ndarray]]:
        async def requests():
            counter = itertools.count()
            if hasattr(batches, "__aiter__"):
                async for b in batches:
                    yield embed_pb2.EmbedStreamRequest(id=str(next(counter)),
                                                       request=build_embed_request(b, **options))
            else:
                for b in batches:
                    yield embed_pb2.EmbedStreamRequest(id=str(next(counter)),
                                                       request=build_embed_request(b, **options))

        async for response in self.embed_stub.EmbedStream(requests(), **self.call_options):
            yield _stream_item(response)

    async def tokenize(self, texts: Sequence[str], *, model: str = "") -> list[list[int]]:
        request = model_pb2.TokenizeRequest(model=model, texts=texts)
        response = await self.model_stub.Tokenize(request, **self.call_options)
        return [list(r.ids) for r in response.results]

    async def list_models(self) -> list[model_pb2.ModelInfo]:
        response = await self.model_stub.ListModels(model_pb2.ListModelsRequest(),
                                                **self.call_options)
        return list(response.models)

    async def health(self, service: str = "") -> str:
        response = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                           **self.call_options)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class StreamItemError(Exception):
    """One request of a stream failed; `code` is the gRPC status code."""

    def __init__(self, index: int, code: grpc.StatusCode, message: str):
        super().__init__(f"batch {index}: {code.name}: {message}")
        self.index, self.code, self.message = index, code, message


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def _stream_item(response: embed_pb2.EmbedStreamResponse) -> tuple[int, np.ndarray]:
    index = int(response.id)
    if response.WhichOneof("result") == "error":
        raise StreamItemError(index, _CODES.get(response.error.code, grpc.StatusCode.UNKNOWN),
                              response.error.message)
    return index, decode_tensor(response.response.embeddings)
