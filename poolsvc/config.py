"""Every server default, written once. The CLI is generated from these dataclasses."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field

from poolsvc.engine.params import PoolingType

BUNDLED_MODEL = "bundled:all-MiniLM-L6-v2"
# The hub id of the bundled model: served from the bundled copy when the package is installed.
BUNDLED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
DTYPES = ("auto", "float32", "float16", "bfloat16")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$")


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and why."""


@dataclass(frozen=True)
class ModelSpec:
    """One served model: where its files come from and the name requests use for it."""

    source: str
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """`[NAME=]PATH_OR_HUB_ID`; NAME defaults to the source's last path component."""
        name, sep, source = text.partition("=")
        if not sep:
            name, source = "", text
        return cls(source=source.strip(), name=name.strip())

    def __post_init__(self):
        if not self.source:
            raise ConfigError("--model needs a directory, a hub id, or " + BUNDLED_MODEL)
        if not self.name:
            object.__setattr__(self, "name", self.source.rstrip("/").split("/")[-1].split(":")[-1])
        if not _NAME.match(self.name):
            raise ConfigError(f"model name {self.name!r} may only use letters, digits and ._/:-")


@dataclass(frozen=True)
class PoolerConfig:
    """Server-side pooling overrides for a model (vLLM's --override-pooler-config). Unset fields
    leave the model's own configuration in force; requests can still override per call."""

    pooling_type: PoolingType | None = None
    normalize: bool | None = None
    # Whether classification / scoring / reward outputs go through the task's activation.
    activation: bool | None = None
    # STEP pooling: the token id that marks the end of a step, and which columns of the head's
    # output to return (process reward models).
    step_tag_id: int | None = None
    returned_token_ids: tuple[int, ...] | None = None
    # Embed inputs longer than the model's limit in chunks, then average them weighted by tokens.
    enable_chunked_processing: bool = False
    # With chunking: the longest input accepted, in tokens (default: 16 chunks' worth).
    max_embed_len: int | None = None

    @classmethod
    def from_json(cls, text: str) -> PoolerConfig:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"--pooler-config is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError("--pooler-config must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(data) - known):
            raise ConfigError(f"--pooler-config has unknown keys {unknown}; known: {sorted(known)}")
        if data.get("pooling_type") is not None:
            name = str(data["pooling_type"]).upper()
            try:
                data["pooling_type"] = PoolingType[name]
            except KeyError:
                raise ConfigError(f"pooling_type {name!r} is not one of "
                                  f"{[p.name for p in PoolingType]}") from None
        if data.get("returned_token_ids") is not None:
            data["returned_token_ids"] = tuple(data["returned_token_ids"])
        return cls(**data)

    def __post_init__(self):
        for name in ("normalize", "activation", "enable_chunked_processing"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"pooler config {name} must be true or false")
        for name in ("step_tag_id", "max_embed_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"pooler config {name} must be a positive integer")
        ids = self.returned_token_ids
        if ids is not None and (not ids or not all(isinstance(i, int) and i >= 0 for i in ids)):
            raise ConfigError("pooler config returned_token_ids must be a list of token ids")

    def merged(self, other: PoolerConfig) -> PoolerConfig:
        """This config with `other`'s explicitly set fields on top."""
        changes = {f.name: getattr(other, f.name) for f in dataclasses.fields(other)
                   if getattr(other, f.name) != f.default}
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class PoolerOverride:
    """`--pooler-config [NAME=]JSON`: for the model served as NAME, or for every model."""

    model: str
    config: PoolerConfig

    @classmethod
    def parse(cls, text: str) -> PoolerOverride:
        text = text.strip()
        name, sep, rest = text.partition("=")
        if text.startswith("{") or not sep:
            return cls("", PoolerConfig.from_json(text))
        return cls(name.strip(), PoolerConfig.from_json(rest))


def _opt(help: str, **kw):
    return field(metadata={"help": help, **kw.pop("meta", {})}, **kw)


@dataclass(frozen=True)
class ServerConfig:
    """Settings of `poolsvc serve`; field help texts become the CLI's."""

    models: tuple[ModelSpec, ...] = _opt(
        "[NAME=]PATH_OR_HUB_ID of a model to serve (a Sentence-Transformers or Hugging Face "
        "directory, or a hub id); repeat to serve several, the first is the default. "
        f"Default: the bundled all-MiniLM-L6-v2 ({BUNDLED_MODEL})",
        default=(ModelSpec(BUNDLED_MODEL),),
        meta={"flag": "--model", "repeat": ModelSpec.parse, "metavar": "[NAME=]PATH_OR_HUB_ID"})
    pooler_configs: tuple[PoolerOverride, ...] = _opt(
        "[NAME=]JSON pooling overrides, e.g. '{\"pooling_type\": \"MEAN\", \"normalize\": false}'; "
        "keys: pooling_type, normalize, activation, step_tag_id, returned_token_ids, "
        "enable_chunked_processing, max_embed_len. Without NAME it applies to every model; "
        "repeatable", default=(),
        meta={"flag": "--pooler-config", "repeat": PoolerOverride.parse,
              "metavar": "[NAME=]JSON"})
    host: str = _opt("address to listen on", default="127.0.0.1")
    port: int = _opt("port to listen on (0 picks a free one)", default=50051)
    device: str = _opt("torch device: auto (cuda when available), cpu, cuda, cuda:N",
                       default="auto")
    dtype: str = _opt("compute dtype: auto (float32 on CPU, float16 on CUDA), float32, float16, "
                      "bfloat16", default="auto", meta={"choices": DTYPES})
    max_batch_tokens: int = _opt("token budget of one device batch (inputs are packed, so this "
                                 "counts real tokens, not padding)", default=16384)
    max_batch_inputs: int = _opt("most inputs in one device batch", default=512)
    quantize: str = _opt("int8: int8 dynamic quantization of the linear layers (CPU only; "
                         "accuracy and speed in docs/benchmarks.md)", default="none",
                         meta={"choices": ("none", "int8")})
    disable_kernels: bool = _opt("on CUDA, run PyTorch ops instead of the Triton kernels "
                                 "(kernels/), to bisect a numerical difference", default=False)
    auto_truncate: bool = _opt("truncate over-long inputs when a request does not say; without "
                               "it they are rejected with INVALID_ARGUMENT", default=False)
    allow_pickle_weights: bool = _opt(
        "load pickled PyTorch .bin checkpoints when a model has no safetensors (unsafe for "
        "untrusted models: unpickling can run code)", default=False)
    threads: int = _opt("torch CPU threads (0: one per core)", default=0)
    tokenizer_workers: int = _opt("threads tokenizing requests off the event loop (0: one per "
                                  "core)", default=0)
    max_concurrent_requests: int = _opt(
        "requests admitted at once (unary calls and stream items alike); past it requests are "
        "refused with RESOURCE_EXHAUSTED instead of queueing without bound", default=1024)
    max_stream_inflight: int = _opt("requests of one stream being processed at once; further "
                                    "requests wait in flow control", default=64)
    max_inputs_per_request: int = _opt("most inputs (or score pairs) one request may carry; more "
                                       "is RESOURCE_EXHAUSTED", default=2048)
    max_chars_per_input: int = _opt("longest text accepted, in characters, checked before "
                                    "tokenizing; longer is RESOURCE_EXHAUSTED", default=100_000)
    max_image_bytes: int = _opt("largest encoded image accepted, checked before decoding; larger "
                                "is RESOURCE_EXHAUSTED", default=20 << 20)
    max_image_pixels: int = _opt("most pixels (width x height) an image may decode to, read from "
                                 "its header before decoding (decompression bombs); more is "
                                 "RESOURCE_EXHAUSTED", default=50_000_000)
    max_message_bytes: int = _opt("largest request or response message", default=64 << 20)
    grace_period: float = _opt("seconds in-flight calls get to finish on SIGTERM", default=10.0)
    log_level: str = _opt("logging level", default="INFO",
                          meta={"choices": ("DEBUG", "INFO", "WARNING", "ERROR")})
    log_format: str = _opt("text, or json (one object per line, for log collectors)",
                           default="text", meta={"choices": ("text", "json")})
    metrics_port: int = _opt("serve Prometheus metrics (/metrics) and HTTP probes (/healthz, "
                             "/readyz) on this port of the same host; 0: off", default=0)
    tls_cert: str = _opt("PEM certificate chain: serve TLS instead of plaintext", default="")
    tls_key: str = _opt("PEM private key of --tls-cert", default="")
    tls_client_ca: str = _opt("PEM CA bundle: require client certificates signed by it (mutual "
                              "TLS)", default="")
    api_key: str = _opt("require 'authorization: Bearer KEY' on every model RPC (health and "
                        "reflection stay open for probes)", default="")
    api_key_file: str = _opt("read the API key from this file instead (first line)", default="")

    def __post_init__(self):
        if not self.models:
            raise ConfigError("serve at least one model")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"served model names must be unique, got {names}: use NAME=PATH")
        for override in self.pooler_configs:
            if override.model and override.model not in names:
                raise ConfigError(f"--pooler-config names model {override.model!r}, which is "
                                  f"not served; served: {', '.join(names)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be 0..65535, got {self.port}")
        if self.quantize not in ("none", "int8"):
            raise ConfigError(f"--quantize must be none or int8, got {self.quantize!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("max_batch_tokens", "max_batch_inputs", "max_stream_inflight",
                     "max_concurrent_requests", "max_inputs_per_request", "max_chars_per_input",
                     "max_image_bytes", "max_image_pixels",
                     "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("threads", "tokenizer_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be 0 (auto) or more")
        if self.grace_period < 0:
            raise ConfigError("--grace-period must be >= 0 seconds")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port must be 0 (off) or a port, got {self.metrics_port}")
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

    def pooler_config(self, model: str) -> PoolerConfig:
        """The overrides for one served model: those for every model, then its own."""
        config = PoolerConfig()
        for override in sorted(self.pooler_configs, key=lambda o: bool(o.model)):
            if override.model in ("", model):
                config = config.merged(override.config)
        return config

    def read_api_key(self) -> str:
        if not self.api_key_file:
            return self.api_key
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
