"""OpenAI's embeddings API: `POST /v1/embeddings` and `GET /v1/models`, with OpenAI's request
fields (unknown ones refused, as OpenAI does) plus vLLM's extensions to it (`normalize`,
`truncate_prompt_tokens`)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field, field_validator

from poolsvc.engine.errors import InvalidInputError
from poolsvc.engine.params import PoolingParams, Task
from poolsvc.engine.request import PoolingRequest
from poolsvc.http.common import (
    STRICT,
    Front,
    base64_floats,
    check_inputs,
    created,
    prompts,
    truncate_prompt_tokens,
    usage,
)


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request."""

    model_config = STRICT

    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, texts, token ids, or lists of token ids")
    model: str = Field("", description="a served model's name or alias, or a LoRA adapter's "
                       "name; empty: the default")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Matryoshka: keep the first N")
    user: str | None = Field(None, description="accepted and not used")
    normalize: bool | None = Field(None, description="vLLM's: L2-normalize (the model's default)")
    truncate_prompt_tokens: int | None = Field(
        None, description="vLLM's: keep this many tokens of each input (-1: the model's maximum)")

    _inputs = field_validator("input", mode="before")(lambda cls, v: check_inputs(v, "input"))

    def to_request(self, front: Front, arrival_ns: int) -> PoolingRequest:
        params = PoolingParams(normalize=self.normalize, dimensions=self.dimensions)
        return PoolingRequest(Task.EMBED, prompts(self.input, front.limits), model=self.model,
                              params=params,
                              truncation=truncate_prompt_tokens(self.truncate_prompt_tokens),
                              arrival_ns=arrival_ns)


def embeddings_body(out, encoding_format: str) -> dict:
    if out.is_sparse:  # no OpenAI shape for it
        raise _sparse_error()
    data = [{"object": "embedding", "index": i,
             "embedding": base64_floats(row) if encoding_format == "base64" else row.tolist()}
            for i, row in enumerate(out.embeddings)]
    tokens = usage(out.prompt_lens)
    return {"object": "list", "data": data, "model": out.model,
            "usage": {"prompt_tokens": tokens["prompt_tokens"],
                      "total_tokens": tokens["total_tokens"]}}


def _sparse_error():
    return InvalidInputError("this model gives sparse embeddings, which the OpenAI embeddings "
                             "API cannot carry: use gRPC Embed")


def router(front: Front) -> APIRouter:
    routes = APIRouter(tags=["OpenAI"])

    @routes.post("/v1/embeddings", summary="Embeddings, as OpenAI's API")
    async def embeddings(body: EmbeddingRequest):
        return await front.answer(lambda arrival: body.to_request(front, arrival),
                                  lambda out: embeddings_body(out, body.encoding_format))

    @routes.get("/v1/models", summary="The served models, as OpenAI lists them")
    async def models():
        stamp = created()
        data = [{"id": name, "object": "model", "created": stamp, "owned_by": "poolsvc",
                 "root": m.source, "max_model_len": m.max_input_tokens}
                for m in front.engine.describe() for name in (m.name, *m.aliases)]
        # LoRA adapters as models of their own, as vLLM lists them: `model` selects one
        data += [{"id": a.name, "object": "model", "created": stamp, "owned_by": "poolsvc",
                  "root": a.source, "parent": m.name, "max_model_len": m.max_input_tokens}
                 for m in front.engine.describe() for a in m.adapters]
        return await front.render(lambda _: {"object": "list", "data": data}, None)

    return routes

