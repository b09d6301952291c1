"""The engine's errors. Each says what to change; the service maps each class to one status.

A message that tells the caller to set a request option names it by `Option`; each front (the
gRPC service, the offline API) spells the option its own way (`EngineError.spelled`)."""

from __future__ import annotations

import enum
from collections.abc import Mapping


class Option(enum.Enum):
    """Request options an error message may point the caller to."""

    TRUNCATE = "truncate"                # turn truncation on
    TRUNCATE_LENGTH = "truncate_length"  # the length inputs are truncated to


def quoted(value: str, limit: int = 64) -> str:
    """`value` as a message quotes it: repr'd, and cut to `limit` characters (callers' values
    can be megabytes long, and an error message travels in a size-limited header)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


class EngineError(Exception):
    """An error the caller can act on (as opposed to a bug)."""

    def __init__(self, message: str, *, option: Option | None = None):
        super().__init__(message)
        self.option = option

    def spelled(self, spelling: Mapping[Option, str]) -> str:
        """The message with the option it points to, as the caller's API spells it."""
        if self.option is None:
            return str(self)
        return f"{self} ({spelling[self.option]})"


class InvalidInputError(EngineError):
    """The request cannot be served as written: bad values, over-long input, wrong model kind."""


class ModelNotFoundError(EngineError):
    """The request names a model this server does not serve."""


class AdapterNotFoundError(ModelNotFoundError):
    """The request's `adapter` names a LoRA adapter the model is not served with."""


class OverloadedError(EngineError):
    """A capacity limit is reached; retrying later may succeed."""


class TooLargeError(OverloadedError):
    """A request (or the response it asks for) is over a size limit; retrying will not help:
    the caller must split it or ask for less."""


class DeadlineExceededError(EngineError):
    """The caller's deadline passed before the work could run; it was dropped, not computed."""


class UnsupportedError(EngineError):
    """The server does not implement what the request asks for."""


class UnavailableError(EngineError):
    """The engine is not ready yet, or is shutting down."""


class ModelLoadError(EngineError):
    """A model's files cannot be loaded; raised at start-up."""
