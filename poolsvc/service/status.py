"""The one table from engine errors to gRPC status codes."""

from __future__ import annotations

import logging
import uuid

import grpc

from poolsvc.engine.errors import (
    DeadlineExceededError,
    EngineError,
    InvalidInputError,
    ModelNotFoundError,
    Option,
    OverloadedError,
    UnavailableError,
    UnsupportedError,
)

log = logging.getLogger(__name__)

STATUS_OF_ERROR: dict[type[Exception], grpc.StatusCode] = {
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnsupportedError: grpc.StatusCode.UNIMPLEMENTED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
}


# The longest status message sent (gRPC carries it in a header; the default limit is 8 KiB).
MAX_MESSAGE = 1024
# How the request messages spell the options an error points to.
GRPC_SPELLING = {
    Option.TRUNCATE: "truncation.enabled=true",
    Option.TRUNCATE_LENGTH: "truncation.max_tokens",
}


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status for `exc`. Anything not in the table is a bug: INTERNAL, logged with its
    traceback under an id the client sees."""
    for cls in type(exc).__mro__:
        if cls in STATUS_OF_ERROR:
            message = exc.spelled(GRPC_SPELLING) if isinstance(exc, EngineError) else str(exc)
            if len(message) > MAX_MESSAGE:  # a status travels in a size-limited header
                message = message[:MAX_MESSAGE - 3] + "..."
            return STATUS_OF_ERROR[cls], message
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s", incident, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error {incident}; the server log has the details"

