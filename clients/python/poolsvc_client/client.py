"""Client (blocking) and AsyncClient (asyncio): one method per poolsvc RPC.

Both share the method definitions below (`_Api`); they differ only in how a call runs: Client
returns the result, AsyncClient returns a coroutine to await (or, for streams, an async
iterator). A failed call raises PoolsvcError with the gRPC status code and the server's message.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence

import grpc
import numpy as np

from poolsvc_client import build, results
from poolsvc_client.build import Text
from poolsvc_client.channel import make_channel
from poolsvc_client.errors import PoolsvcError, StreamItemError
from poolsvc_client.gen.health import health_pb2, health_pb2_grpc
from poolsvc_client.gen.v1 import (
    classify_pb2,
    classify_pb2_grpc,
    embed_pb2,
    embed_pb2_grpc,
    encode_pb2,
    encode_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
    score_pb2,
    score_pb2_grpc,
)


class _Api:
    """The RPCs. Subclasses define how one runs: _unary and _stream."""

    def __init__(self, channel, api_key: str | None, timeout: float | None):
        self.channel = channel
        self.timeout = timeout
        # sent with every call; plaintext too, so local and sidecar-TLS set-ups work alike
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.call_options = {"timeout": timeout, "metadata": self.metadata}
        self.embed_stub = embed_pb2_grpc.EmbedServiceStub(channel)
        self.classify_stub = classify_pb2_grpc.ClassifyServiceStub(channel)
        self.score_stub = score_pb2_grpc.ScoreServiceStub(channel)
        self.encode_stub = encode_pb2_grpc.EncodeServiceStub(channel)
        self.model_stub = model_pb2_grpc.ModelServiceStub(channel)
        self.health_stub = health_pb2_grpc.HealthStub(channel)

    # --- unary RPCs ------------------------------------------------------------------------------

    def embed(self, texts: Text | Sequence[Text], **options) -> np.ndarray:
        """[N, D] embeddings. Options: see build.embed_request (model, adapter, normalize,
        dimensions, truncate, truncation_side, dtype, prompt_name, prompt)."""
        return self._unary(self.embed_stub.Embed, build.embed_request(texts, **options),
                           results.embeddings)

    def embed_sparse(self, texts: Text | Sequence[Text], *, top_k: int = 0,
                     return_tokens: bool = False, **options) -> list[results.SparseVector]:
        """A sparse (SPLADE) model's embeddings: per input its non-zero weights, largest first,
        cut to the `top_k` largest (0: all), with the tokens' strings if `return_tokens`."""
        return self._unary(self.embed_stub.Embed, build.embed_request(
            texts, sparse_top_k=top_k, return_tokens=return_tokens, **options),
            results.sparse_embeddings)

    def embed_multi(self, texts: Text | Sequence[Text], *,
                    types: Sequence[str] = ("dense", "sparse", "multi_vector"),
                    **options) -> results.MultiEmbedding:
        """Several embeddings of each input from one forward pass (BGE-M3): `types` among
        "dense", "sparse" (lexical weights; options top_k, return_tokens) and "multi_vector"."""
        top_k, tokens = options.pop("top_k", 0), options.pop("return_tokens", False)
        return self._unary(self.embed_stub.Embed, build.embed_request(
            texts, embedding_types=types, sparse_top_k=top_k, return_tokens=tokens, **options),
            results.multi_embedding)

    def embed_response(self, texts: Text | Sequence[Text], **options) -> embed_pb2.EmbedResponse:
        """The whole EmbedResponse (usage, timing) rather than the array."""
        return self._unary(self.embed_stub.Embed, build.embed_request(texts, **options),
                           lambda response: response)

    def classify(self, texts: Text | Sequence[Text], **options) -> results.Classification:
        """Class probabilities `.probs` [N, num_labels] and their `.labels`. Options: see
        build.classify_request (model, adapter, activation, truncate, truncation_side, dtype,
        prompts)."""
        return self._unary(self.classify_stub.Classify, build.classify_request(texts, **options),
                           results.classification)

    def score(self, queries: Text | Sequence[Text], documents: Text | Sequence[Text],
              **options) -> np.ndarray:
        """[N] scores of the pairs (1:N, N:1 or N:N): a cross-encoder's relevance, or the cosine
        of two embeddings. Options: model, adapter, activation, truncate, truncation_side."""
        return self._unary(self.score_stub.Score,
                           build.score_request(queries, documents, **options), results.scores)

    def rerank(self, query: Text, documents: Text | Sequence[Text],
               **options) -> list[results.RerankResult]:
        """The documents best first, as (index, score, document). Options: model, top_n,
        return_documents, activation, truncate, truncation_side, adapter."""
        return self._unary(self.score_stub.Rerank,
                           build.rerank_request(query, documents, **options), results.ranking)

    def encode(self, texts: Text | Sequence[Text], **options) -> list[np.ndarray]:
        """One raw output per input (per-token embeddings or classes, rewards). Options: see
        build.encode_request (model, adapter, task, normalize, activation, truncate, dtype,
        prompts)."""
        return self._unary(self.encode_stub.Encode, build.encode_request(texts, **options),
                           results.encodings)

    def encode_multi_vector(self, texts: Text | Sequence[Text], *, role: str = "document",
                            **options) -> list[np.ndarray]:
        """A multi-vector (ColBERT) model's vectors: per text a [num_tokens, D] array, encoded
        as `role` "query" (its marker, expanded to the query length) or "document" (its marker,
        no skip-list tokens). Options: model, normalize, truncate, truncation_side, dtype."""
        request = build.encode_request(texts, task="token_embed", input_role=role, **options)
        return self._unary(self.encode_stub.Encode, request, results.encodings)

    def classify_tokens(self, texts: Text | Sequence[Text],
                        **options) -> list[results.TokenLabels]:
        """A token classifier's (NER) labels: per text, each token's probabilities `.probs`,
        the `.labels`, each token's character `.offsets`, `.predicted` and `.spans(text)`.
        Options: model, activation, truncate, truncation_side, prompt_name, prompt."""
        request = build.encode_request(texts, task="token_classify", return_offsets=True,
                                       **options)
        return self._unary(self.encode_stub.Encode, request, results.token_labels)

    def tokenize(self, texts: str | Sequence[str], **options) -> list[list[int]]:
        """The token ids of each text, as the model sees them. Options: model,
        add_special_tokens, prompt_name, prompt, truncate, truncation_side."""
        return self._unary(self.model_stub.Tokenize, build.tokenize_request(texts, **options),
                           results.token_ids)

    def list_models(self) -> list[model_pb2.ModelInfo]:
        """Every served model: name, tasks, dimensions, limits, pooling, labels, prompts."""
        return self._unary(self.model_stub.ListModels, model_pb2.ListModelsRequest(),
                           lambda response: list(response.models))

    def model_info(self, model: str = "") -> model_pb2.ModelInfo:
        """One model's ModelInfo ("": the default model)."""
        return self._unary(self.model_stub.GetModelInfo,
                           model_pb2.GetModelInfoRequest(model=model), results.model_info)

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, ... for the server ("") or one service."""
        return self._unary(self.health_stub.Check,
                           health_pb2.HealthCheckRequest(service=service),
                           lambda r: health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))

    # --- streams: many requests on one call, answered as they finish ------------------------------
    # Each yields (index of the batch in `batches`, its result), in completion order. A failed
    # batch raises StreamItemError, which ends the iteration; with return_errors=True it is
    # yielded as the result instead and the stream goes on.

    def embed_stream(self, batches, *, return_errors: bool = False, **options):
        """Embeds each batch of texts; yields (index, [N, D]), or (index, [SparseVector]) from a
        sparse model (options sparse_top_k, return_tokens)."""
        build.embed_request([], **options)  # a bad option fails here, not inside the stream
        return self._stream(self.embed_stub.EmbedStream, batches, lambda i, b: (
            embed_pb2.EmbedStreamRequest(id=str(i), request=build.embed_request(b, **options))),
            results.dense_or_sparse, return_errors)

    def classify_stream(self, batches, *, return_errors: bool = False, **options):
        """Classifies each batch of texts; yields (index, Classification)."""
        build.classify_request([], **options)
        return self._stream(self.classify_stub.ClassifyStream, batches, lambda i, b: (
            classify_pb2.ClassifyStreamRequest(id=str(i),
                                               request=build.classify_request(b, **options))),
            results.classification, return_errors)

    def score_stream(self, pairs, *, return_errors: bool = False, **options):
        """Scores each (queries, documents) of `pairs`; yields (index, [N])."""
        build.score_request([], [], **options)
        return self._stream(self.score_stub.ScoreStream, pairs, lambda i, p: (
            score_pb2.ScoreStreamRequest(id=str(i), request=build.score_request(*p, **options))),
            results.scores, return_errors)

    def encode_stream(self, batches, *, return_errors: bool = False, **options):
        """Encodes each batch of texts; yields (index, [one array per input])."""
        build.encode_request([], **options)
        return self._stream(self.encode_stub.EncodeStream, batches, lambda i, b: (
            encode_pb2.EncodeStreamRequest(id=str(i), request=build.encode_request(b, **options))),
            results.encodings, return_errors)


def _stream_item(response, decode: Callable, return_errors: bool):
    index = int(response.id)
    if response.WhichOneof("result") == "error":
        error = StreamItemError.from_status(index, response.error.code, response.error.message)
        if return_errors:
            return index, error
        raise error
    return index, decode(response.response)


class Client(_Api):
    """Blocking client. `target` is host:port (or any gRPC name, e.g. dns:///poolsvc:50051 for
    round-robin over a headless service). TLS: `tls`, or `root_ca` (PEM path) to trust, and
    `cert`/`key` to present for mutual TLS; `api_key` is sent as a bearer token; `timeout` is each
    call's deadline in seconds; or pass your own `channel`."""

    def __init__(self, target: str = "127.0.0.1:50051", *, channel: grpc.Channel | None = None,
                 timeout: float | None = 60.0, api_key: str | None = None, tls: bool = False,
                 root_ca: str | None = None, cert: str | None = None, key: str | None = None):
        super().__init__(channel or make_channel(target, tls=tls, root_ca=root_ca, cert=cert,
                                                 key=key), api_key, timeout)

    def _unary(self, method, request, decode: Callable):
        try:
            response = method(request, **self.call_options)
        except grpc.RpcError as error:
            raise PoolsvcError.from_rpc(error) from None
        return decode(response)

    def _stream(self, method, items: Iterable, make: Callable, decode: Callable,
                return_errors: bool) -> Iterator:
        counter = itertools.count()
        call = method((make(next(counter), item) for item in items), **self.call_options)
        try:
            for response in call:
                yield _stream_item(response, decode, return_errors)
        except grpc.RpcError as error:
            raise PoolsvcError.from_rpc(error) from None
        finally:
            call.cancel()  # no-op once finished; stops the call when the caller stops reading

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Api):
    """asyncio client with Client's options and methods: `await client.embed(...)`,
    `async for index, vectors in client.embed_stream(...)`. Stream inputs may be iterables or
    async iterables. Create it inside a running event loop."""

    def __init__(self, target: str = "127.0.0.1:50051", *,
                 channel: grpc.aio.Channel | None = None, timeout: float | None = 60.0,
                 api_key: str | None = None, tls: bool = False, root_ca: str | None = None,
                 cert: str | None = None, key: str | None = None):
        super().__init__(channel or make_channel(target, tls=tls, root_ca=root_ca, cert=cert,
                                                 key=key, aio=True), api_key, timeout)

    async def _unary(self, method, request, decode: Callable):
        try:
            response = await method(request, **self.call_options)
        except grpc.RpcError as error:  # grpc.aio.AioRpcError included
            raise PoolsvcError.from_rpc(error) from None
        return decode(response)

    async def _stream(self, method, items: Iterable | AsyncIterable, make: Callable,
                      decode: Callable, return_errors: bool) -> AsyncIterator:
        async def requests():
            counter = itertools.count()
            if isinstance(items, AsyncIterable):
                async for item in items:
                    yield make(next(counter), item)
            else:
                for item in items:
                    yield make(next(counter), item)

        call = method(requests(), **self.call_options)
        try:
            async for response in call:
                yield _stream_item(response, decode, return_errors)
        except grpc.RpcError as error:
            raise PoolsvcError.from_rpc(error) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
