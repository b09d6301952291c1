"""Channels to poolsvc: the documented service config (round-robin, retries), TLS, size limits."""

from __future__ import annotations

from importlib import resources

import grpc

SERVICE_CONFIG = (resources.files("poolsvc_client") / "service_config.json").read_text()


def channel_options(max_message_bytes: int = 64 << 20) -> list[tuple[str, object]]:
    """The documented service config (round_robin over every address the name resolves to, and
    retries of UNAVAILABLE, which a draining or restarting replica answers, and of CANCELLED, which
    gRPC's core answers for a call that reaches a closing port: grpc/grpc#41785), plus message
    size."""
    return [("grpc.service_config", SERVICE_CONFIG), ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def _credentials(root_ca: str | None, cert: str | None, key: str | None):
    def read(path):
        with open(path, "rb") as f:
            return f.read()
    return grpc.ssl_channel_credentials(root_certificates=read(root_ca) if root_ca else None,
                                        private_key=read(key) if key else None,
                                        certificate_chain=read(cert) if cert else None)


def make_channel(target: str, *, tls: bool = False, root_ca: str | None = None,
                 cert: str | None = None, key: str | None = None, aio: bool = False):
    """A channel to poolsvc: plaintext, or TLS (`tls`, or any of the PEM paths: `root_ca` to
    trust, `cert`/`key` to present for mutual TLS)."""
    module = grpc.aio if aio else grpc
    if tls or root_ca or cert:
        return module.secure_channel(target, _credentials(root_ca, cert, key), channel_options())
    return module.insecure_channel(target, channel_options())
