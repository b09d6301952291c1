"""What every route shares: the checks of the peers' input forms (a text, texts, token ids),
running one engine request through the one admission path, and the small pieces of the peers'
response bodies (usage, ids, base64 vectors)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ConfigDict
from starlette.responses import Response

from poolsvc.engine.config import Limits
from poolsvc.engine.errors import InvalidInputError
from poolsvc.engine.params import Truncation
from poolsvc.engine.request import PoolingRequest, now_ns
from poolsvc.service import admitted

if TYPE_CHECKING:  # the engine pulls in torch; the routes need only its types
    from poolsvc.engine.engine import Engine

# The peers reject a wrong JSON type rather than coerce it (a string for a number, 1 for true).
STRICT = ConfigDict(strict=True, extra="forbid")
LENIENT = ConfigDict(strict=True, extra="ignore")  # vLLM ignores fields it does not know


def is_id(value) -> bool:
    """A token id's JSON type: an integer. Its range, [0, vocabulary size), is the engine's to
    check (it names the input and the range), for negative ids as for ids past the end."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_inputs(value, name: str = "input"):
    """OpenAI's and vLLM's `input`: a text, a list of texts, token ids, or lists of token ids;
    none empty. Raises ValueError saying which form to send."""
    if isinstance(value, str):
        if not value:
            raise ValueError("is an empty text: send at least one character")
        return value
    if not isinstance(value, list):
        raise ValueError("must be a text, a list of texts, a list of token ids, or a list of "
                         "token-id lists")
    if not value:
        raise ValueError("is empty: send at least one input")
    if all(is_id(v) for v in value):
        return value
    if all(isinstance(v, int) for v in value):
        raise ValueError("has a token id that is not an integer (true and false are not ids)")
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item:
                raise ValueError(f"{name}[{i}] is an empty text: send at least one character")
        elif isinstance(item, list):
            if not item:
                raise ValueError(f"{name}[{i}] is an empty list of token ids")
            if not all(is_id(v) for v in item):
                raise ValueError(f"{name}[{i}] must be a list of token ids (integers)")
        else:
            raise ValueError(f"{name}[{i}] must be a text or a list of token ids")
    if len({isinstance(item, str) for item in value}) > 1:
        raise ValueError("mixes texts and token-id lists: send one kind")
    return value


def check_texts(value, name: str):
    """A text or a non-empty list of non-empty texts (score sides, rerank documents)."""
    texts = [value] if isinstance(value, str) else value
    if texts == []:
        raise ValueError("is empty: send at least one text")
    if not isinstance(texts, list):
        raise ValueError("must be a text or a list of texts")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{name}[{i}] must be a text")
        if not text:
            raise ValueError(f"{name}[{i}] is an empty text: send at least one character")
    return value


def prompts(value, limits: Limits) -> tuple:
    """A checked `input` as the engine's inputs; the limits on their number and on token ids
    are checked before anything is converted (as for gRPC)."""
    if isinstance(value, str):
        value = [value]
    elif value and all(is_id(v) for v in value):
        value = [value]  # one input given as token ids
    limits.check_inputs(len(value))
    limits.check_token_ids([len(v) for v in value if isinstance(v, list)])
    return tuple(value)


def texts(value, limits: Limits) -> tuple[str, ...]:
    value = [value] if isinstance(value, str) else value
    limits.check_inputs(len(value))
    return tuple(value)


class Front:
    """The engine as the routes reach it: `answer` admits a request, prepares it in the worker
    pool, awaits the engine and renders the body in the pool (large vectors as JSON take a
    while: not on the event loop)."""

    def __init__(self, engine: Engine, pool: Executor):
        self.engine, self.pool = engine, pool

    @property
    def limits(self) -> Limits:
        return self.engine.limits

    async def answer(self, build: Callable[[int], PoolingRequest],
                     render: Callable[[Any], dict]) -> Response:
        """`build(arrival_ns)`: the engine request; `render(output)`: the response body."""
        return await self.render(render, await self.run(build))

    async def run(self, build: Callable[[int], PoolingRequest]):
        """The engine's output for `build(arrival_ns)`, admitted as every call is."""
        arrival = now_ns()
        _, out = await admitted.run(self.engine, self.pool, None, lambda: (None, build(arrival)))
        return out

    async def render(self, render: Callable[[Any], dict], value) -> Response:
        """The body as JSON: on the event loop when small, else in the pool (a hop there
        costs more than encoding a few thousand numbers)."""
        if _size(value) <= _RENDER_ON_LOOP:
            return Response(json_bytes(render(value)), media_type="application/json")
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(self.pool, lambda: json_bytes(render(value)))
        return Response(body, media_type="application/json")

    async def in_pool(self, work: Callable[[], Any]):
        return await asyncio.get_running_loop().run_in_executor(self.pool, work)


_RENDER_ON_LOOP = 8192  # numbers


def _size(output) -> int:
    """How many numbers an engine output holds (0 for anything else)."""
    for name in ("embeddings", "probs", "scores"):
        if (array := getattr(output, name, None)) is not None:
            return int(array.size)
    if (arrays := getattr(output, "outputs", None)) is not None:
        return sum(int(a.size) for a in arrays)
    return 0


def json_bytes(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def usage(prompt_lens: Sequence[int]) -> dict:
    tokens = int(sum(prompt_lens))
    return {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def created() -> int:
    return int(time.time())


def base64_floats(row: np.ndarray) -> str:
    """A vector as OpenAI's base64 encoding: little-endian float32 bytes."""
    return base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode("ascii")


def truncate_prompt_tokens(value: int | None) -> Truncation:
    """vLLM's `truncate_prompt_tokens`: k keeps k tokens, -1 the model's maximum."""
    if value is None:
        return Truncation()
    if value == 0 or value < -1:
        raise InvalidInputError("truncate_prompt_tokens must be a positive number of tokens, or "
                                f"-1 for the model's maximum; got {value}")
    return Truncation(enabled=True, max_tokens=value)

