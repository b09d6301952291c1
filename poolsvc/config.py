"""Every server default, written once. The CLI is generated from these dataclasses."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

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
    host: str = _opt("address to listen on", default="127.0.0.1")
    port: int = _opt("port to listen on (0 picks a free one)", default=50051)
    device: str = _opt("torch device: auto (cuda when available), cpu, cuda, cuda:N",
                       default="auto")
    dtype: str = _opt("compute dtype: auto (float32 on CPU, float16 on CUDA), float32, float16, "
                      "bfloat16", default="auto", meta={"choices": DTYPES})
    max_batch_tokens: int = _opt("token budget of one device batch (inputs are packed, so this "
                                 "counts real tokens, not padding)", default=16384)
    max_batch_inputs: int = _opt("most inputs in one device batch", default=512)
    auto_truncate: bool = _opt("truncate over-long inputs when a request does not say; without "
                               "it they are rejected with INVALID_ARGUMENT", default=False)
    allow_pickle_weights: bool = _opt(
        "load pickled PyTorch .bin checkpoints when a model has no safetensors (unsafe for "
        "untrusted models: unpickling can run code)", default=False)
    threads: int = _opt("torch CPU threads (0: one per core)", default=0)
    tokenizer_workers: int = _opt("threads tokenizing requests off the event loop (0: one per "
                                  "core)", default=0)
    max_stream_inflight: int = _opt("requests of one stream being processed at once; further "
                                    "requests wait in flow control", default=64)
    max_message_bytes: int = _opt("largest request or response message", default=64 << 20)
    grace_period: float = _opt("seconds in-flight calls get to finish on SIGTERM", default=10.0)
    log_level: str = _opt("logging level", default="INFO",
                          meta={"choices": ("DEBUG", "INFO", "WARNING", "ERROR")})

    def __post_init__(self):
        if not self.models:
            raise ConfigError("serve at least one model")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"served model names must be unique, got {names}: use NAME=PATH")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be 0..65535, got {self.port}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("max_batch_tokens", "max_batch_inputs", "max_stream_inflight",
                     "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("threads", "tokenizer_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be 0 (auto) or more")
        if self.grace_period < 0:
            raise ConfigError("--grace-period must be >= 0 seconds")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def replace(self, **changes) -> ServerConfig:
        return dataclasses.replace(self, **changes)
