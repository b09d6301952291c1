"""OpenAI batch files, as vLLM's `run-batch` reads and writes them: a request line
`{"custom_id", "method": "POST", "url", "body"}` becomes one PoolingRequest, and its output one
response line `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`
whose body is the endpoint's OpenAI / vLLM response.

URLs: /v1/embeddings (body: model, input: a text, texts, token ids or lists of them, dimensions,
encoding_format float | base64, normalize, truncate_prompt_tokens); /score and /v1/score (text_1,
text_2: one or many each; use_activation); /rerank, /v1/rerank and /v2/rerank (query, documents,
top_n, return_documents); /classify (input); /pooling (input, task). A line that cannot be served
gets status 400 (404 for an unknown model) with vLLM's error body, and the run goes on."""

from __future__ import annotations

import base64
import enum
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from poolsvc.engine.errors import EngineError, InvalidInputError, ModelNotFoundError, Option
from poolsvc.engine.outputs import ClassifyOutput, EmbedOutput, EncodeOutput, Output, ScoreOutput
from poolsvc.engine.params import PoolingParams, Task, Truncation
from poolsvc.engine.request import PoolingRequest

# How a batch body spells the options an engine error points to.
BODY_SPELLING = {
    Option.TRUNCATE: 'set "truncate_prompt_tokens": -1 in the body, or run with --auto-truncate',
    Option.TRUNCATE_LENGTH: '"truncate_prompt_tokens" in the body',
}


class Endpoint(enum.Enum):
    EMBEDDINGS = "embeddings"
    SCORE = "score"
    RERANK = "rerank"
    CLASSIFY = "classify"
    POOLING = "pooling"


URLS = {"/v1/embeddings": Endpoint.EMBEDDINGS, "/score": Endpoint.SCORE,
        "/v1/score": Endpoint.SCORE, "/rerank": Endpoint.RERANK, "/v1/rerank": Endpoint.RERANK,
        "/v2/rerank": Endpoint.RERANK, "/classify": Endpoint.CLASSIFY,
        "/pooling": Endpoint.POOLING}
# Body keys each endpoint reads; others are refused by name ("user" is OpenAI's, and unused).
_KEYS = {
    Endpoint.EMBEDDINGS: {"model", "input", "dimensions", "encoding_format", "normalize",
                          "truncate_prompt_tokens", "user"},
    Endpoint.SCORE: {"model", "text_1", "text_2", "use_activation", "activation",
                     "truncate_prompt_tokens", "user"},
    Endpoint.RERANK: {"model", "query", "documents", "top_n", "return_documents",
                      "use_activation", "activation", "truncate_prompt_tokens", "user"},
    Endpoint.CLASSIFY: {"model", "input", "use_activation", "activation",
                        "truncate_prompt_tokens", "user"},
    Endpoint.POOLING: {"model", "input", "task", "dimensions", "normalize", "use_activation",
                       "activation", "truncate_prompt_tokens", "user"},
}
_ID_PREFIX = {Endpoint.EMBEDDINGS: "embd", Endpoint.SCORE: "score", Endpoint.RERANK: "rerank",
              Endpoint.CLASSIFY: "classify", Endpoint.POOLING: "pool"}


class LineError(Exception):
    """A request line that cannot be served: its HTTP status and the message saying why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class BatchLine:
    """One parsed request line: the engine request and what shapes its response body."""

    custom_id: str
    endpoint: Endpoint
    request: PoolingRequest
    encoding_format: str = "float"
    top_n: int = 0
    return_documents: bool = True


def parse_line(text: str, default_task: Callable[[str], Task]) -> BatchLine:
    """The request on one line of a batch file, or LineError saying what is wrong with it.
    `default_task(model)`: the task of a /pooling body that names none (as LLM.encode, the
    model's per-token task)."""
    try:
        line = json.loads(text)
    except ValueError as exc:
        raise LineError(f"not JSON: {exc}") from None
    if not isinstance(line, dict):
        raise LineError("a batch line must be a JSON object with custom_id, method, url, body")
    custom_id, url, body = line.get("custom_id"), line.get("url"), line.get("body")
    if custom_id is None and url is None:
        raise LineError("not an OpenAI batch request (custom_id, method, url, body); to embed "
                        "plain texts, write a .npy or .parquet output instead of .jsonl")
    if not isinstance(custom_id, str):
        raise LineError("custom_id must be a string")
    if line.get("method", "POST") != "POST":
        raise LineError(f"method must be POST, got {line.get('method')!r}")
    if url not in URLS:
        raise LineError(f"url {url!r} is not served by run-batch; URLs: {', '.join(URLS)}")
    if not isinstance(body, dict):
        raise LineError("body must be a JSON object")
    endpoint = URLS[url]
    if unknown := sorted(set(body) - _KEYS[endpoint]):
        raise LineError(f"{url} body has unknown keys {unknown}; known: "
                        f"{sorted(_KEYS[endpoint])}")
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise LineError("body model must be a string")
    params = _params(body)
    truncation = _truncation(body.get("truncate_prompt_tokens"))
    common = dict(model=model, params=params, truncation=truncation)
    if endpoint is Endpoint.EMBEDDINGS:
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise LineError(f"encoding_format must be float or base64, got {fmt!r}")
        request = PoolingRequest(Task.EMBED, _inputs(body, "input"), **common)
        return BatchLine(custom_id, endpoint, request, encoding_format=fmt)
    if endpoint is Endpoint.CLASSIFY:
        return BatchLine(custom_id, endpoint,
                         PoolingRequest(Task.CLASSIFY, _inputs(body, "input"), **common))
    if endpoint is Endpoint.POOLING:
        task = _task(body.get("task")) or default_task(model)
        return BatchLine(custom_id, endpoint,
                         PoolingRequest(task, _inputs(body, "input"), raw=True, **common))
    if endpoint is Endpoint.SCORE:
        request = PoolingRequest(Task.SCORE, _texts(body, "text_1"), _texts(body, "text_2"),
                                 **common)
        return BatchLine(custom_id, endpoint, request)
    query, documents = body.get("query"), _texts(body, "documents")
    if not isinstance(query, str):
        raise LineError("rerank body query must be a string")
    top_n = body.get("top_n") or 0
    if not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 0:
        raise LineError("top_n must be a non-negative integer (0: all documents)")
    keep = body.get("return_documents", True)
    if not isinstance(keep, bool):
        raise LineError("return_documents must be true or false")
    return BatchLine(custom_id, endpoint,
                     PoolingRequest(Task.SCORE, (query,), documents, **common),
                     top_n=top_n, return_documents=keep)


def _params(body: dict) -> PoolingParams:
    values = {}
    for key in ("dimensions", "normalize"):
        if body.get(key) is not None:
            values[key] = body[key]
    activation = [body[k] for k in ("use_activation", "activation") if body.get(k) is not None]
    if len(set(activation)) > 1:
        raise LineError("use_activation and activation disagree; give one")
    if activation:
        values["activation"] = activation[0]
    if "dimensions" in values and (not isinstance(values["dimensions"], int)
                                   or isinstance(values["dimensions"], bool)
                                   or values["dimensions"] < 1):
        raise LineError("dimensions must be a positive integer")
    for key in ("normalize", "activation"):
        if key in values and not isinstance(values[key], bool):
            raise LineError(f"{key} must be true or false")
    return PoolingParams(**values)


def _truncation(value) -> Truncation:
    if value is None:
        return Truncation()
    if not isinstance(value, int) or isinstance(value, bool) or value == 0 or value < -1:
        raise LineError("truncate_prompt_tokens must be a positive number of tokens, or -1 for "
                        f"the model's maximum; got {value!r}")
    return Truncation(enabled=True, max_tokens=value)


def _task(name) -> Task | None:
    if name in (None, "encode"):
        return None
    try:
        return Task(name)
    except ValueError:
        raise LineError(f"task {name!r} is not one of "
                        f"{['encode'] + [t.value for t in Task]}") from None


def _inputs(body: dict, key: str) -> tuple:
    """A text, texts, token ids, or lists of token ids."""
    value = body.get(key)
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(_is_id(v) for v in value):
        value = [value]  # one input given as token ids
    if not isinstance(value, list) or not value:
        raise LineError(f"{key} must be a text, a list of texts, or token ids")
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item.strip():
                raise LineError(f"{key}[{i}] is empty: nothing to embed")
        elif not (isinstance(item, list) and item and all(_is_id(v) for v in item)):
            raise LineError(f"{key}[{i}] must be a text or a list of token ids")
    return tuple(value)


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _texts(body: dict, key: str) -> tuple[str, ...]:
    value = body.get(key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise LineError(f"{key} must be a text or a non-empty list of texts")
    return tuple(value)


# --- response lines ------------------------------------------------------------------------------

def response_body(line: BatchLine, out: Output, created: int, request_id: str) -> dict:
    """The endpoint's response body for the request's output (vLLM's shapes)."""
    tokens = sum(out.prompt_lens)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}
    head = {"id": f"{_ID_PREFIX[line.endpoint]}-{request_id}", "object": "list",
            "created": created, "model": out.model}
    if isinstance(out, EmbedOutput):
        data = [{"index": i, "object": "embedding",
                 "embedding": _base64(row) if line.encoding_format == "base64" else row.tolist()}
                for i, row in enumerate(out.embeddings)]
        return {**head, "data": data, "usage": usage}
    if isinstance(out, ClassifyOutput):
        data = [{"index": i, "label": out.labels[int(np.argmax(row))] if out.labels else None,
                 "probs": row.tolist(), "num_classes": len(row)}
                for i, row in enumerate(out.probs)]
        return {**head, "data": data, "usage": usage}
    if isinstance(out, EncodeOutput):
        data = [{"index": i, "object": "pooling", "data": a.tolist()}
                for i, a in enumerate(out.outputs)]
        return {**head, "data": data, "usage": usage}
    assert isinstance(out, ScoreOutput)
    if line.endpoint is Endpoint.SCORE:
        data = [{"index": i, "object": "score", "score": float(s)}
                for i, s in enumerate(out.scores)]
        return {**head, "data": data, "usage": usage}
    order = sorted(range(len(out.scores)), key=lambda i: -float(out.scores[i]))
    if line.top_n:
        order = order[:line.top_n]
    results = [{"index": i, **({"document": {"text": line.request.documents[i]}}
                               if line.return_documents else {}),
                "relevance_score": float(out.scores[i])} for i in order]
    return {"id": head["id"], "model": out.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "results": results}


def _base64(row: np.ndarray) -> str:
    return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")


def error_status(exc: BaseException) -> int:
    if isinstance(exc, LineError):
        return exc.status
    if isinstance(exc, ModelNotFoundError):
        return 404
    if isinstance(exc, (InvalidInputError, EngineError)):
        return 400
    return 500


def error_message(exc: BaseException) -> str:
    if isinstance(exc, EngineError):
        return exc.spelled(BODY_SPELLING)
    return str(exc)


_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}


def output_line(line_id: str, custom_id: str | None, request_id: str, status: int,
                body: dict | None, message: str | None) -> bytes:
    """One line of the batch output file: a response, or (status >= 400) an error."""
    error = None
    if message is not None:
        error = {"message": message, "type": _ERROR_TYPES.get(status, "BadRequestError"),
                 "param": None, "code": status}
        body = {"error": error}
    record = {"id": line_id, "custom_id": custom_id,
              "response": {"status_code": status, "request_id": request_id, "body": body},
              "error": error}
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


# --- a chunk of lines through the engine ---------------------------------------------------------

@dataclass
class Responses:
    """A chunk's output lines (one per non-blank request line, in order), its failed lines as
    (chunk position, custom_id, reason), and the tokens the model saw."""

    data: bytes
    errors: list[tuple[int, str | None, str]]
    tokens: int


class BatchFileRequests:
    """Submits a chunk's request lines to the engine, and turns their outputs into response
    lines. `run_id` makes each line's ids, so a resumed run writes the same bytes."""

    def __init__(self, engine, run_id: str, created: int):
        self.engine = engine
        self.run_id = run_id
        self.created = created

    def _default_task(self, model: str) -> Task:
        return self.engine.model(model).default_task

    def submit(self, chunk) -> list:
        """Per row: (row, parsed line or None, future or the error)."""
        pending = []
        for row in chunk.rows:
            if row.error is None and not row.text.strip():
                continue  # a blank line, as vLLM skips it
            line, result = None, None
            try:
                if row.error is not None:
                    raise LineError(row.error)
                line = parse_line(row.text, self._default_task)
                result = self.engine.submit(line.request)
            except (LineError, EngineError) as exc:
                result = exc
            pending.append((row, line, result))
        return pending

    def collect(self, chunk, pending) -> Responses:
        out, errors, tokens = bytearray(), [], 0
        first = chunk.rows[0].index if chunk.rows else 0
        for row, line, result in pending:
            request_id = f"{self.run_id}-{row.index}"
            line_id = f"batch-{request_id}"
            custom_id = line.custom_id if line else _custom_id(row.text)
            if not isinstance(result, BaseException):
                try:
                    result = result.result()
                except EngineError as exc:
                    result = exc
            if isinstance(result, BaseException):
                message = error_message(result)
                out += output_line(line_id, custom_id, request_id, error_status(result), None,
                                   message)
                errors.append((row.index - first, custom_id, message))
                continue
            tokens += sum(result.prompt_lens)
            body = response_body(line, result, self.created, request_id)
            out += output_line(line_id, custom_id, request_id, 200, body, None)
        return Responses(bytes(out), errors, tokens)


def _custom_id(text: str | None) -> str | None:
    """The custom_id of a line that did not parse as a request, where it has one."""
    try:
        value = json.loads(text).get("custom_id") if text else None
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
