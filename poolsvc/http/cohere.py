"""Cohere's v2 API: `POST /v2/embed` (texts; `input_type` chooses the model's named prompt;
several `embedding_types` at once) and `POST /v2/rerank`, with Cohere's fields (unknown ones
refused) and response bodies."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field, field_validator

from poolsvc.engine.errors import InvalidInputError
from poolsvc.engine.params import OutputDType, PoolingParams, PromptOptions, Task, Truncation
from poolsvc.engine.params import TruncationSide as Side
from poolsvc.engine.request import PoolingRequest
from poolsvc.http.common import STRICT, Front, check_texts, request_id, texts
from poolsvc.http.vllm import ranking

EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary"]
DTYPES = {"float": OutputDType.FLOAT32, "int8": OutputDType.INT8, "uint8": OutputDType.UINT8,
          "binary": OutputDType.BINARY, "ubinary": OutputDType.UBINARY}
InputType = Literal["search_document", "search_query", "classification", "clustering"]
# The model's named prompts (its Sentence-Transformers `prompts`) each input_type takes, the
# first the model has; a model with none of them gets its default prompt, if any.
PROMPT_NAMES = {
    "search_query": ("search_query", "query"),
    "search_document": ("search_document", "document", "passage", "corpus"),
    "classification": ("classification",),
    "clustering": ("clustering",),
}
_SIDES = {"END": Side.RIGHT, "START": Side.LEFT}
_META = {"api_version": {"version": "2"}}


class EmbedBody(BaseModel):
    """Cohere's v2 embed request (texts)."""

    model_config = STRICT

    model: str = Field(description="a served model's name or alias, or a LoRA adapter's name")
    texts: list[str] = Field(description="the texts to embed")
    input_type: InputType | None = Field(None, description="chooses the model's named prompt")
    embedding_types: list[EmbeddingType] = Field(["float"], min_length=1)
    output_dimension: int | None = Field(None, ge=1, description="Matryoshka: keep the first N")
    max_tokens: int | None = Field(None, ge=1, description="truncate each text to N tokens")
    truncate: Literal["NONE", "START", "END"] = "END"
    priority: int | None = Field(None, description="accepted; poolsvc has no priorities")

    _texts = field_validator("texts", mode="before")(lambda cls, v: _texts_list(v, "texts"))

    def truncation(self) -> Truncation:
        if self.truncate == "NONE":
            if self.max_tokens is not None:
                raise InvalidInputError('max_tokens needs truncation: drop it, or set "truncate" '
                                        'to "END" or "START"')
            return Truncation(enabled=False)
        return Truncation(enabled=True, max_tokens=self.max_tokens or 0,
                          side=_SIDES[self.truncate])

    def to_request(self, front: Front, dtype: OutputDType, arrival_ns: int) -> PoolingRequest:
        params = PoolingParams(dimensions=self.output_dimension, out_dtype=dtype)
        return PoolingRequest(Task.EMBED, texts(self.texts, front.limits), model=self.model,
                              params=params, truncation=self.truncation(),
                              prompt=self.prompt(front), arrival_ns=arrival_ns)

    def prompt(self, front: Front) -> PromptOptions:
        if self.input_type is None:
            return PromptOptions()
        have = front.engine.model(self.model).prompts
        name = next((n for n in PROMPT_NAMES[self.input_type] if n in have), "")
        return PromptOptions(name=name)


class RerankBody(BaseModel):
    """Cohere's v2 rerank request."""

    model_config = STRICT

    model: str
    query: str
    documents: list[str]
    top_n: int | None = Field(None, ge=1, description="keep the best N (default: all)")
    max_tokens_per_doc: int | None = Field(
        None, ge=1, description="cut each document to its first N tokens before pairing")
    priority: int | None = Field(None, description="accepted; poolsvc has no priorities")

    _documents = field_validator("documents", mode="before")(
        lambda cls, v: _texts_list(v, "documents"))

    def to_request(self, front: Front, arrival_ns: int) -> PoolingRequest:
        if not self.query:
            raise InvalidInputError("query is an empty text: send the query")
        documents = texts(self.documents, front.limits)
        if self.max_tokens_per_doc is not None:
            documents = cut_documents(front, self.model, documents, self.max_tokens_per_doc)
        return PoolingRequest(Task.SCORE, (self.query,), documents, model=self.model,
                              arrival_ns=arrival_ns)


def cut_documents(front: Front, model: str, documents: tuple[str, ...],
                  max_tokens: int) -> tuple[str, ...]:
    """Cohere's `max_tokens_per_doc`: each document cut to its first `max_tokens` tokens (the
    model's tokenizer, no special tokens) before it is paired with the query; the text is cut
    where its last kept token ends. A limit at or past the model's maximum cuts nothing: the
    pair's own limit applies."""
    if max_tokens >= front.engine.model(model).max_input_tokens:
        return documents
    _, encodings = front.engine.tokenize(model, documents, Truncation(max_tokens=max_tokens),
                                         add_special_tokens=False, offsets=True)
    return tuple(doc[:enc.offsets[-1][1]] if enc.overflowing else doc
                 for doc, enc in zip(documents, encodings))


def _texts_list(value, name: str):
    if not isinstance(value, list):
        raise ValueError("must be a list of texts")
    return check_texts(value, name)


def router(front: Front) -> APIRouter:
    routes = APIRouter(tags=["Cohere"])

    @routes.post("/v2/embed", summary="Embeddings, as Cohere's v2 embed")
    async def embed(body: EmbedBody):
        kinds = list(dict.fromkeys(body.embedding_types))
        # One engine request per type, submitted together so that they share batches.
        outs = await asyncio.gather(*(
            front.run(lambda arrival, kind=kind: body.to_request(front, DTYPES[kind], arrival))
            for kind in kinds))
        for out in outs:
            if out.is_sparse:
                raise InvalidInputError("this model gives sparse embeddings, which Cohere's embed "
                                        "API cannot carry: use gRPC Embed")

        def render(_):
            tokens = sum(outs[0].prompt_lens)
            return {"id": request_id("embed"), "response_type": "embeddings_by_type",
                    "embeddings": {kind: out.embeddings.tolist() for kind, out in zip(kinds, outs)},
                    "texts": body.texts,
                    "meta": {**_META, "billed_units": {"input_tokens": tokens}}}
        return await front.render(render, None)

    @routes.post("/v2/rerank", summary="Documents sorted by relevance, as Cohere's v2 rerank")
    async def rerank(body: RerankBody):
        def render(out):
            results = [{"index": i, "relevance_score": float(out.scores[i])}
                       for i in ranking(out.scores, body.top_n or 0)]
            return {"id": request_id("rerank"), "results": results,
                    "meta": {**_META, "billed_units": {"search_units": 1}}}
        return await front.answer(lambda arrival: body.to_request(front, arrival), render)

    return routes
