"""How poolsvc's services are wired into grpc.aio, and how their requests are decoded.

Every poolsvc RPC receives its request as raw bytes (no request deserializer): nothing is decoded
before authentication and admission, and decoding runs in the worker pool, never on the event
loop. Bytes that are not a valid message (malformed wire data, invalid UTF-8 in a string) are
INVALID_ARGUMENT, as is any other bad input."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from poolsvc.engine.errors import InvalidInputError, TooLargeError


def generic_handler(servicer, service) -> grpc.GenericRpcHandler:
    """A handler for `service` (a ServiceDescriptor) calling `servicer`'s method of each RPC's
    name with the request's bytes (or, for client streams, an iterator of bytes)."""
    handlers = {}
    for method in service.methods:
        call = getattr(servicer, method.name)
        serialize = method.output_type._concrete_class.SerializeToString
        if method.client_streaming and method.server_streaming:
            make = grpc.stream_stream_rpc_method_handler
        elif method.client_streaming:
            make = grpc.stream_unary_rpc_method_handler
        elif method.server_streaming:
            make = grpc.unary_stream_rpc_method_handler
        else:
            make = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(call, request_deserializer=None,
                                     response_serializer=serialize)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def check_size(raw: bytes, max_bytes: int | None) -> None:
    """gRPC takes messages a little over the server's limit, so that a stream item over it gets
    its own error answer: the limit itself is checked here."""
    if max_bytes is not None and len(raw) > max_bytes:
        raise TooLargeError(f"the request is {len(raw)} bytes, more than the server's limit "
                              f"of {max_bytes} (--max-message-bytes): split it")


def decode(raw: bytes, message_type, max_bytes: int | None = None):
    """`raw` as a `message_type`, its size checked first."""
    check_size(raw, max_bytes)
    try:
        return message_type.FromString(raw)
    except DecodeError as exc:
        raise InvalidInputError(
            f"the request is not a valid {message_type.DESCRIPTOR.full_name} ({exc}); check "
            "that strings are UTF-8 and the client's stubs match poolsvc's protos") from None


def stream_item_id(raw: bytes) -> str:
    """Field 1 (`id`) of a stream item, read from the wire directly: an answer to an item that
    cannot be decoded as a whole still carries the id it answers, when the id itself is
    readable. "" otherwise."""
    pos, end = 0, len(raw)
    try:
        while pos < end:
            key, pos = _varint(raw, pos)
            field, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(raw, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                size, pos = _varint(raw, pos)
                if field == 1:
                    return raw[pos:pos + size].decode("utf-8")[:256]
                pos += size
            else:
                return ""
    except (IndexError, UnicodeDecodeError):
        pass
    return ""


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")
