"""What an HTTP caller gets when a call fails: the status from the one error table
(service/status.py), in the JSON error body of the API the route imitates, with options named as
that API spells them."""

from __future__ import annotations

import enum
import json

from fastapi.exceptions import RequestValidationError
from starlette.responses import Response

from poolsvc.engine.errors import Option
from poolsvc.service.status import HTTP_STATUS_OF_ERROR, internal, known_error, message_of


class Peer(enum.Enum):
    """Whose API a route imitates, which decides its error body."""

    OPENAI = "openai"   # {"error": {"message", "type", "param", "code"}}
    VLLM = "vllm"       # the same envelope, vLLM's type names and an integer code
    COHERE = "cohere"   # {"message"}


def peer_of(path: str) -> Peer:
    if path.startswith("/v2/"):
        return Peer.COHERE
    if path in ("/v1/embeddings", "/v1/models"):
        return Peer.OPENAI
    return Peer.VLLM


# How each API spells the options an engine error points to.
SPELLING = {
    Peer.OPENAI: {Option.TRUNCATE: 'send "truncate_prompt_tokens": -1 in the body (the OpenAI '
                                   "SDK: extra_body)",
                  Option.TRUNCATE_LENGTH: '"truncate_prompt_tokens" in the body'},
    Peer.VLLM: {Option.TRUNCATE: 'send "truncate_prompt_tokens": -1',
                Option.TRUNCATE_LENGTH: '"truncate_prompt_tokens"'},
    Peer.COHERE: {Option.TRUNCATE: 'send "truncate": "END" (or "START")',
                  Option.TRUNCATE_LENGTH: '"max_tokens"'},
}
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                 404: "invalid_request_error", 405: "invalid_request_error",
                 413: "invalid_request_error",
                 429: "rate_limit_error", 503: "service_unavailable_error"}
_OPENAI_CODES = {401: "invalid_api_key", 404: "model_not_found", 413: "request_too_large",
                 429: "rate_limit_exceeded"}
_VLLM_TYPES = {400: "BadRequestError", 401: "Unauthorized", 404: "NotFoundError",
               405: "MethodNotAllowed",
               413: "RequestEntityTooLarge", 429: "TooManyRequests",
               503: "ServiceUnavailableError"}


def error_response(peer: Peer, status: int, message: str, param: str | None = None) -> Response:
    if peer is Peer.COHERE:
        body = {"message": message}
    elif peer is Peer.OPENAI:
        body = {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "api_error"),
                          "param": param, "code": _OPENAI_CODES.get(status)}}
    else:
        kind = _VLLM_TYPES.get(status, "InternalServerError")
        body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return Response(json.dumps(body), status, headers, media_type="application/json")


def engine_error_response(path: str, exc: Exception) -> Response:
    """The answer to an exception from a route's work: the table's status, or 500 for a bug
    (logged with its traceback)."""
    peer = peer_of(path)
    cls = known_error(exc)
    if cls is None:
        return error_response(peer, 500, internal(exc))
    return error_response(peer, HTTP_STATUS_OF_ERROR[cls], message_of(exc, SPELLING[peer]))


def validation_message(exc: RequestValidationError, fields: tuple[str, ...] = ()) -> str:
    """A body that does not fit the route's request model, said with the caller's field names
    (as the JSON spells them) and what to change; `fields`: the route's fields, for unknown
    ones."""
    parts: list[str] = []
    seen: set[str] = set()
    for error in exc.errors():
        where = _where(error.get("loc", ()))
        kind = error.get("type", "")
        if where in seen:
            continue
        seen.add(where)
        if kind == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "")
            parts.append(f"the body is not valid JSON ({reason}); send a JSON object")
        elif kind == "missing":
            parts.append(f"{where} is required")
        elif kind == "extra_forbidden":
            known = f"; this route takes {', '.join(fields)}" if fields else ""
            parts.append(f"unknown field {where!r}: remove it{known}")
        elif not where and kind in _NOT_AN_OBJECT:
            parts.append("the body must be a JSON object with this route's fields")
        else:
            message = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
            parts.append(message if not where or message.startswith(where) else
                         f"{where} {message}" if kind == "value_error" else f"{where}: {message}")
        if len(parts) == 4:
            break
    return "; ".join(parts) or "the body does not fit this route's request"


def _where(loc) -> str:
    """`("body", "input", 0)` as `input[0]`; the names pydantic gives union members and
    validators (`str`, `list[int]`, `function-after[...]`) are not the caller's."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in _TYPE_NAMES:
            out += f".{part}" if out else part
    return out


_NOT_AN_OBJECT = {"model_type", "model_attributes_type", "dict_type"}
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "is_instance"}
