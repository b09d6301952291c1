"""The one table from engine errors to what each front answers: a gRPC status code, and the HTTP
status the JSON routes (poolsvc/http) answer."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping

import grpc

from poolsvc.engine.errors import (
    AdapterNotFoundError,
    DeadlineExceededError,
    EngineError,
    InvalidInputError,
    ModelNotFoundError,
    Option,
    OverloadedError,
    TooLargeError,
    UnavailableError,
    UnsupportedError,
)

log = logging.getLogger(__name__)

# error class: (gRPC status, HTTP status). A subclass not listed answers as its nearest listed
# base class.
ERROR_TABLE: dict[type[Exception], tuple[grpc.StatusCode, int]] = {
    InvalidInputError: (grpc.StatusCode.INVALID_ARGUMENT, 400),
    ModelNotFoundError: (grpc.StatusCode.NOT_FOUND, 404),
    AdapterNotFoundError: (grpc.StatusCode.NOT_FOUND, 404),  # the field `adapter`
    TooLargeError: (grpc.StatusCode.RESOURCE_EXHAUSTED, 413),  # split it: a retry cannot help
    OverloadedError: (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),  # retry later
    UnsupportedError: (grpc.StatusCode.UNIMPLEMENTED, 501),
    UnavailableError: (grpc.StatusCode.UNAVAILABLE, 503),
    DeadlineExceededError: (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
}
STATUS_OF_ERROR = {cls: codes[0] for cls, codes in ERROR_TABLE.items()}
HTTP_STATUS_OF_ERROR = {cls: codes[1] for cls, codes in ERROR_TABLE.items()}


# The longest status message sent (gRPC carries it in a header; the default limit is 8 KiB).
MAX_MESSAGE = 1024
# How the request messages spell the options an error points to.
GRPC_SPELLING = {
    Option.TRUNCATE: "truncation.enabled=true",
    Option.TRUNCATE_LENGTH: "truncation.max_tokens",
}


def known_error(exc: Exception) -> type[Exception] | None:
    """The table's row for `exc`: its class or nearest listed base; None for a bug."""
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return cls
    return None


def message_of(exc: Exception, spelling: Mapping[Option, str]) -> str:
    """A known error's message, options spelled as the caller's API spells them, cut to
    MAX_MESSAGE."""
    message = exc.spelled(spelling) if isinstance(exc, EngineError) else str(exc)
    if len(message) > MAX_MESSAGE:  # a status travels in a size-limited header
        message = message[:MAX_MESSAGE - 3] + "..."
    return message


def internal(exc: BaseException) -> str:
    """Logs a bug with its traceback under an id; the message the caller gets."""
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s", incident, exc_info=exc)
    return f"internal error {incident}; the server log has the details"


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status for `exc`. Anything not in the table is a bug: INTERNAL, logged with its
    traceback under an id the client sees."""
    cls = known_error(exc)
    if cls is None:
        return grpc.StatusCode.INTERNAL, internal(exc)
    return STATUS_OF_ERROR[cls], message_of(exc, GRPC_SPELLING)
