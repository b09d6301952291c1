"""The client's errors: a failed call carries its gRPC status code and the server's message."""

from __future__ import annotations

import grpc

_CODES = {c.value[0]: c for c in grpc.StatusCode}
# The server's messages name the options to change as the request messages spell them (see
# poolsvc/service/status.py); this client's keywords spell them differently.
_SPELLING = {
    "(truncation.enabled=true)": "(truncate=True)",
    "(truncation.max_tokens)": "(truncate=<number of tokens>)",
}


def _in_client_spelling(details: str) -> str:
    for grpc_spelling, ours in _SPELLING.items():
        details = details.replace(grpc_spelling, ours)
    return details


class PoolsvcError(Exception):
    """A poolsvc call failed. `code` is the grpc.StatusCode (INVALID_ARGUMENT, NOT_FOUND,
    UNAVAILABLE, ...), `details` the server's message, which says what to change."""

    def __init__(self, code: grpc.StatusCode, details: str):
        details = _in_client_spelling(details)
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> PoolsvcError:
        code = error.code() if callable(getattr(error, "code", None)) else None
        details = error.details() if callable(getattr(error, "details", None)) else None
        return cls(code or grpc.StatusCode.UNKNOWN, details or str(error))


class StreamItemError(PoolsvcError):
    """One request of a stream failed (the stream itself went on); `index` is its position in
    what was sent."""

    def __init__(self, index: int, code: grpc.StatusCode, details: str):
        super().__init__(code, details)
        self.index = index
        self.args = (f"batch {index}: {code.name}: {details}",)

    @property
    def message(self) -> str:  # the name this attribute had before `details`
        return self.details

    @classmethod
    def from_status(cls, index: int, code: int, details: str) -> StreamItemError:
        return cls(index, _CODES.get(code, grpc.StatusCode.UNKNOWN), details)
