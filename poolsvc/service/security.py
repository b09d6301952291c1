"""TLS credentials and bearer-token authentication for the model RPCs."""

from __future__ import annotations

import hmac

import grpc

from poolsvc.config import ServerConfig

# Only the model RPCs need the token: health checks and reflection stay open for probes and tools.
PROTECTED_PREFIX = "/poolsvc.v1."


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None
    with open(config.tls_key, "rb") as f:
        key = f.read()
    with open(config.tls_cert, "rb") as f:
        cert = f.read()
    client_ca = None
    if config.tls_client_ca:
        with open(config.tls_client_ca, "rb") as f:
            client_ca = f.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses model RPCs without `authorization: Bearer <key>` with UNAUTHENTICATED."""

    def __init__(self, key: str):
        self._expected = f"Bearer {key}".encode()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_PREFIX):
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if isinstance(given, str) and hmac.compare_digest(given.encode(), self._expected):
            return handler
        return _refusal(handler, "missing or wrong API key: send the metadata "
                                 "'authorization: Bearer <key>'")


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(streaming, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(unary, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
