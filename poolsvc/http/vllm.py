"""vLLM's pooling routes: `/pooling`, `/classify`, `/score` (`text_1`/`text_2` or
`queries`/`documents`), `/rerank` and `/v1/rerank`, `/tokenize`, with vLLM's request fields and
response bodies. As vLLM does, fields a route does not know are ignored; wrong types are not."""

from __future__ import annotations

from typing import Literal

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, Field, field_validator, model_validator

from poolsvc.engine.errors import InvalidInputError
from poolsvc.engine.params import PoolingParams, Task, Truncation
from poolsvc.engine.request import PoolingRequest
from poolsvc.http.common import (
    LENIENT,
    Front,
    base64_floats,
    check_inputs,
    check_texts,
    created,
    prompts,
    request_id,
    texts,
    truncate_prompt_tokens,
    usage,
)

Inputs = str | list[str] | list[int] | list[list[int]]
Texts = str | list[str]


class _Common(BaseModel):
    model_config = LENIENT

    model: str = Field("", description="a served model's name or alias, or a LoRA adapter's "
                       "name; empty: the default")
    truncate_prompt_tokens: int | None = Field(
        None, description="keep this many tokens of each input (-1: the model's maximum)")
    user: str | None = None

    @property
    def truncation(self) -> Truncation:
        return truncate_prompt_tokens(self.truncate_prompt_tokens)


class _Activation(_Common):
    use_activation: bool | None = Field(None, description="apply the model's activation "
                                        "(softmax, sigmoid); default: the model's")
    activation: bool | None = Field(None, description="older spelling of use_activation")

    def params(self, **more) -> PoolingParams:
        given = {v for v in (self.use_activation, self.activation) if v is not None}
        if len(given) > 1:
            raise InvalidInputError("use_activation and activation disagree: send one")
        return PoolingParams(activation=given.pop() if given else None, **more)


class PoolingBody(_Activation):
    """vLLM's /pooling: each input's raw pooled output (LLM.encode)."""

    input: Inputs
    task: Literal["embed", "classify", "token_embed", "token_classify", "reward", "encode"] | None \
        = Field(None, description="the task; default: the model's per-token task")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    normalize: bool | None = None

    _inputs = field_validator("input", mode="before")(lambda cls, v: check_inputs(v, "input"))

    def to_request(self, front: Front, arrival_ns: int) -> PoolingRequest:
        task = None if self.task in (None, "encode") else Task(self.task)
        if task is None:
            task = front.engine.model(self.model).default_task
        if task is Task.SCORE:
            raise InvalidInputError("/pooling does not score: use /score or /rerank")
        params = self.params(normalize=self.normalize, dimensions=self.dimensions)
        return PoolingRequest(task, prompts(self.input, front.limits), model=self.model,
                              params=params, truncation=self.truncation, raw=True,
                              arrival_ns=arrival_ns)


class ClassifyBody(_Activation):
    """vLLM's /classify: class probabilities per input."""

    input: Inputs

    _inputs = field_validator("input", mode="before")(lambda cls, v: check_inputs(v, "input"))

    def to_request(self, front: Front, arrival_ns: int) -> PoolingRequest:
        return PoolingRequest(Task.CLASSIFY, prompts(self.input, front.limits), model=self.model,
                              params=self.params(), truncation=self.truncation,
                              arrival_ns=arrival_ns)


class ScoreBody(_Activation):
    """vLLM's /score: pair scores, 1:N, N:1 or N:N zipped; the sides as `text_1`/`text_2` or
    `queries`/`documents`."""

    text_1: Texts | None = None
    text_2: Texts | None = None
    queries: Texts | None = None
    documents: Texts | None = None

    @model_validator(mode="before")
    @classmethod
    def _sides(cls, body):
        if not isinstance(body, dict):
            return body
        forms = [(a, b) for a, b in (("text_1", "text_2"), ("queries", "documents"))
                 if a in body or b in body]
        if len(forms) != 1:
            raise ValueError("send the pairs' two sides as text_1 and text_2, or as queries and "
                             "documents (one of the two forms)")
        for name in forms[0]:
            if name not in body:
                raise ValueError(f"{name} is required")
            check_texts(body[name], name)
        return body

    def to_request(self, front: Front, arrival_ns: int) -> PoolingRequest:
        first, second = (self.text_1, self.text_2) if self.text_1 is not None else \
            (self.queries, self.documents)
        return PoolingRequest(Task.SCORE, texts(first, front.limits),
                              texts(second, front.limits), model=self.model,
                              params=self.params(), truncation=self.truncation,
                              arrival_ns=arrival_ns)


class RerankBody(_Activation):
    """vLLM's (and Jina's) /rerank: the documents sorted by their score for the query."""

    query: str
    documents: list[str]
    top_n: int = Field(0, ge=0, description="keep the best N (0: all)")
    return_documents: bool = True

    _query = field_validator("query", mode="before")(lambda cls, v: _query(v))
    _documents = field_validator("documents", mode="before")(lambda cls, v: _documents(v))

    def to_request(self, front: Front, arrival_ns: int) -> PoolingRequest:
        return PoolingRequest(Task.SCORE, (self.query,), texts(self.documents, front.limits),
                              model=self.model, params=self.params(),
                              truncation=self.truncation, arrival_ns=arrival_ns)


def _query(value):
    if isinstance(value, str) and not value:
        raise ValueError("is an empty text: send the query")
    return value


def _documents(value):
    if not isinstance(value, list):
        raise ValueError("must be a list of texts, one per document")
    return check_texts(value, "documents")


class TokenizeBody(_Common):
    """vLLM's /tokenize (a text's form)."""

    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


def ranking(scores: np.ndarray, top_n: int) -> list[int]:
    """Indices, best first (ties in input order), the first `top_n` (0: all)."""
    return [int(i) for i in np.argsort(-scores, kind="stable")[:top_n or None]]


def pooling_body(out, encoding_format: str) -> dict:
    data = [{"index": i, "object": "pooling",
             "data": base64_floats(a) if encoding_format == "base64" else a.tolist()}
            for i, a in enumerate(out.outputs)]
    return {"id": request_id("pool"), "object": "list", "created": created(), "model": out.model,
            "data": data, "usage": usage(out.prompt_lens)}


def classify_body(out) -> dict:
    labels = out.labels
    data = [{"index": i, "label": labels[int(np.argmax(row))] if labels else None,
             "probs": row.tolist(), "num_classes": len(row)} for i, row in enumerate(out.probs)]
    return {"id": request_id("classify"), "object": "list", "created": created(),
            "model": out.model, "data": data, "usage": usage(out.prompt_lens)}


def score_body(out) -> dict:
    data = [{"index": i, "object": "score", "score": float(s)} for i, s in enumerate(out.scores)]
    return {"id": request_id("score"), "object": "list", "created": created(), "model": out.model,
            "data": data, "usage": usage(out.prompt_lens)}


def rerank_body(out, body: RerankBody) -> dict:
    results = [{"index": i, **({"document": {"text": body.documents[i]}}
                               if body.return_documents else {}),
                "relevance_score": float(out.scores[i])} for i in ranking(out.scores, body.top_n)]
    tokens = usage(out.prompt_lens)
    return {"id": request_id("rerank"), "model": out.model,
            "usage": {"total_tokens": tokens["total_tokens"]}, "results": results}


def router(front: Front) -> APIRouter:
    routes = APIRouter(tags=["vLLM"])

    @routes.post("/pooling", summary="Raw pooled outputs per input (vLLM's LLM.encode)")
    async def pooling(body: PoolingBody):
        return await front.answer(lambda arrival: body.to_request(front, arrival),
                                  lambda out: pooling_body(out, body.encoding_format))

    @routes.post("/classify", summary="Class probabilities per input")
    async def classify(body: ClassifyBody):
        return await front.answer(lambda arrival: body.to_request(front, arrival), classify_body)

    for path in ("/score", "/v1/score"):
        @routes.post(path, summary="Sentence-pair scores")
        async def score(body: ScoreBody):
            return await front.answer(lambda arrival: body.to_request(front, arrival), score_body)

    for path in ("/rerank", "/v1/rerank"):
        @routes.post(path, summary="Documents sorted by relevance to a query")
        async def rerank(body: RerankBody):
            return await front.answer(lambda arrival: body.to_request(front, arrival),
                                      lambda out: rerank_body(out, body))

    @routes.post("/tokenize", summary="A text's token ids")
    async def tokenize(body: TokenizeBody):
        ticket = front.engine.admit()
        try:
            model, (enc,) = await front.in_pool(lambda: front.engine.tokenize(
                body.model, [body.prompt], body.truncation,
                add_special_tokens=body.add_special_tokens, offsets=body.return_token_strs))
        finally:
            front.engine.release(ticket)
        return await front.render(lambda _: {
            "count": len(enc.ids), "max_model_len": model.max_input_tokens,
            "tokens": list(enc.ids), "token_strs": list(enc.tokens) if body.return_token_strs
            else None}, None)

    return routes
