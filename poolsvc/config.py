"""Settings of `poolsvc serve`: the engine's (engine/config.py) and the server's own, each default
written once. The CLI is generated from these dataclasses."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

from poolsvc.engine.config import (  # noqa: F401  (re-exported: the settings' one import)
    BUNDLED_HUB_ID,
    BUNDLED_MODEL,
    DTYPES,
    ConfigError,
    EngineConfig,
    Limits,
    ModelSpec,
    PoolerConfig,
    PoolerOverride,
)
from poolsvc.engine.config import option as _opt

# The environment variable the API key may come from instead of a flag.
API_KEY_VARIABLE = "POOLSVC_API_KEY"


@dataclass(frozen=True)
class ServerConfig(EngineConfig):
    """Settings of `poolsvc serve`: the engine's, then the server's; field help texts become the
    CLI's."""

    host: str = _opt("address to listen on", default="127.0.0.1")
    port: int = _opt("port to listen on (0 picks a free one)", default=50051)
    tokenizer_workers: int = _opt("threads tokenizing requests off the event loop (0: one per "
                                  "core); gRPC calls of at most 512 bytes are tokenized on the "
                                  "loop", default=0)
    max_concurrent_requests: int = _opt(
        "requests admitted at once (unary calls and stream items alike); past it requests are "
        "refused with RESOURCE_EXHAUSTED instead of queueing without bound", default=1024)
    max_queue_seconds: float = _opt(
        "most work, in seconds at the rate this device has been running, that may wait ahead "
        "of a new request; past it (or past the call's deadline) requests are refused at once "
        "with RESOURCE_EXHAUSTED, before they are decoded", default=20.0)
    max_stream_inflight: int = _opt("requests of one stream being processed at once; further "
                                    "requests wait in flow control", default=64)
    max_inputs_per_request: int = _opt("most inputs (or score pairs) one request may carry; more "
                                       "is RESOURCE_EXHAUSTED", default=2048)
    max_chars_per_input: int = _opt("longest text accepted, in characters (its prompt "
                                    "included), checked before tokenizing; longer is "
                                    "RESOURCE_EXHAUSTED", default=100_000)
    max_chars_per_request: int = _opt("most characters of text one request may carry, prompts "
                                      "included; more is RESOURCE_EXHAUSTED", default=2_000_000)
    max_image_bytes: int = _opt("largest encoded image accepted, checked before decoding; larger "
                                "is RESOURCE_EXHAUSTED", default=10 << 20)
    max_image_pixels: int = _opt("most pixels (width x height) an image may decode to, read from "
                                 "its header before decoding (decompression bombs); more is "
                                 "RESOURCE_EXHAUSTED", default=50_000_000)
    max_message_bytes: int = _opt("largest request or response message; a request whose "
                                  "response would be larger is refused before it is computed",
                                  default=16 << 20)
    grace_period: float = _opt("seconds in-flight calls get to finish on SIGTERM", default=10.0)
    log_level: str = _opt("logging level", default="INFO",
                          meta={"choices": ("DEBUG", "INFO", "WARNING", "ERROR")})
    log_format: str = _opt("text, or json (one object per line, for log collectors)",
                           default="text", meta={"choices": ("text", "json")})
    metrics_port: int = _opt("serve Prometheus metrics (/metrics) and HTTP probes (/healthz, "
                             "/readyz) on this port of the same host; 0: off", default=0)
    http_port: int = _opt("serve the HTTP/JSON routes (OpenAI /v1/embeddings, vLLM /pooling, "
                          "/score, /rerank, ..., Cohere /v2/embed, /v2/rerank) on this port of "
                          "the same host, from the same engine; 0: off; -1: any free port",
                          default=0)
    tls_cert: str = _opt("PEM certificate chain: serve TLS (on the gRPC and HTTP ports) instead "
                         "of plaintext", default="")
    tls_key: str = _opt("PEM private key of --tls-cert", default="")
    tls_client_ca: str = _opt("PEM CA bundle: require client certificates signed by it (mutual "
                              "TLS)", default="")
    api_key: str = _opt("require 'authorization: Bearer KEY' on every model RPC and HTTP route "
                        "(health, reflection, /health and /metrics stay open for probes); "
                        "visible in the process list: in production use --api-key-file or "
                        "$POOLSVC_API_KEY", default="")
    api_key_file: str = _opt("read the API key from this file instead (first line)", default="")

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be 0..65535, got {self.port}")
        for name in ("max_stream_inflight", "max_concurrent_requests", "max_inputs_per_request",
                     "max_chars_per_input", "max_chars_per_request", "max_image_bytes",
                     "max_image_pixels", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.tokenizer_workers < 0:
            raise ConfigError("--tokenizer-workers must be 0 (auto) or more")
        if self.max_queue_seconds <= 0:
            raise ConfigError("--max-queue-seconds must be above 0")
        if self.grace_period < 0:
            raise ConfigError("--grace-period must be >= 0 seconds")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port must be 0 (off) or a port, got {self.metrics_port}")
        if not -1 <= self.http_port <= 65535:
            raise ConfigError(f"--http-port must be 0 (off), -1 (any free port) or a port, got "
                              f"{self.http_port}")
        if self.http_port > 0 and self.http_port in (self.port, self.metrics_port):
            raise ConfigError(f"--http-port {self.http_port} is taken by --port or "
                              "--metrics-port: choose another")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)")
        if self.api_key and self.api_key_file:
            raise ConfigError("give --api-key or --api-key-file, not both")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "api_key_file"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(f"--{name.replace('_', '-')} {path}: no such file")

    @property
    def limits(self) -> Limits:
        """The per-request limits the engine enforces for this server."""
        same = {f.name: getattr(self, f.name) for f in dataclasses.fields(Limits)
                if hasattr(self, f.name)}
        return Limits(**same, max_response_bytes=self.max_message_bytes)

    def read_api_key(self, environ: Mapping[str, str] = os.environ) -> str:
        """--api-key, else the first line of --api-key-file, else $POOLSVC_API_KEY (the ways
        that keep the key out of the process's command line)."""
        if not self.api_key_file:
            return self.api_key or environ.get(API_KEY_VARIABLE, "").strip()
        with open(self.api_key_file, encoding="utf-8") as f:
            key = f.readline().strip()
        if not key:
            raise ConfigError(f"--api-key-file {self.api_key_file} is empty")
        return key

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def replace(self, **changes) -> ServerConfig:
        return dataclasses.replace(self, **changes)
