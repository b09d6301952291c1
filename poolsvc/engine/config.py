"""What the engine is configured with: the models it serves, their pooling overrides, the device
and the batch budget. Every default is written here once; the server's config extends it (the
CLI is generated from both), and the offline `LLM` builds it directly."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

from poolsvc.engine.errors import TooLargeError
from poolsvc.engine.params import PoolingType

BUNDLED_MODEL = "bundled:all-MiniLM-L6-v2"
# The name the bundled model is served and listed as; `--model all-MiniLM-L6-v2` selects it too.
BUNDLED_NAME = "all-MiniLM-L6-v2"
# The hub id of the bundled model: served from the bundled copy when the package is installed.
BUNDLED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
DTYPES = ("auto", "float32", "float16", "bfloat16")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$")
# Options that no longer exist, and what to use instead; the CLI and LLM both say so, with
# {dtype} in their own spelling (--dtype, dtype).
REMOVED = {
    "quantize": "int8 quantization was removed: it ran at 0.6x bfloat16's speed and further "
                "from float32 (cosine 0.990 against 0.9999). On CPUs with AVX512-BF16 or AMX "
                "use {dtype}=bfloat16, elsewhere float32 (docs/benchmarks.md)",
}


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and why."""


def option(help: str, **kw):
    """A config field with the help text its command-line flag shows."""
    return field(metadata={"help": help, **kw.pop("meta", {})}, **kw)


@dataclass(frozen=True)
class ModelSpec:
    """One served model: where its files come from and the name requests use for it."""

    source: str
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """`[NAME=]PATH_OR_HUB_ID`; NAME defaults to the model's name in the source: a hub id's
        last part, or a directory's last meaningful path component (see `default_name`)."""
        name, sep, source = text.partition("=")
        if not sep:
            name, source = "", text
        return cls(source=source.strip(), name=name.strip())

    def __post_init__(self):
        if not self.source:
            raise ConfigError("--model needs a directory, a hub id, or " + BUNDLED_MODEL)
        if not self.name:
            object.__setattr__(self, "name", default_name(self.source))
        if not _NAME.match(self.name):
            raise ConfigError(f"model name {self.name!r} may only use letters, digits and ._/:-")


@dataclass(frozen=True)
class LoraSpec:
    """`--lora NAME=PATH`: a LoRA adapter in peft's layout, served with the default model;
    requests name it in their `adapter` field (or, as vLLM serves LoRA modules, as `model`)."""

    name: str
    path: str

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        name, sep, path = text.partition("=")
        if not sep:
            raise ConfigError(f"--lora takes NAME=PATH (a peft adapter directory), got {text!r}")
        return cls(name.strip(), path.strip())

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise ConfigError(f"adapter name {self.name!r} may only use letters, digits and "
                              "._/:-")
        if not self.path:
            raise ConfigError(f"--lora {self.name}= needs the adapter's directory")


# Path components that name no model: a hub cache's snapshot hashes, and generic folder names.
_GENERIC_DIRS = {"model", "models", "snapshots", "checkpoint", "checkpoints", "final", "latest",
                 "main", "weights", "hf", "huggingface", "transformers", "onnx", ""}
_HASH = re.compile(r"^[0-9a-f]{40}$")


def default_name(source: str) -> str:
    """The name a model is served as when --model gives none: the bundled model's name, a hub
    id's last part, or the last path component that names a model (`.../bge-small/model` is
    "bge-small"; a hub cache's `models--BAAI--bge-small/snapshots/<hash>` is "bge-small")."""
    if source == BUNDLED_MODEL:
        return BUNDLED_NAME
    parts = source.rstrip("/").split("/")
    for part in reversed(parts):
        if part.startswith("models--"):
            return part.split("--")[-1]
        if part.lower() not in _GENERIC_DIRS and not _HASH.match(part):
            return part.split(":")[-1]
    return parts[-1].split(":")[-1] or "model"


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
    # int8 / uint8 outputs: quantize over [-r, r] on every dimension (engine/compact.py).
    quantization_range: float | None = None
    # LLM rerankers (engine/reranker.py): the false and the true answer token (or the true one
    # alone), the prompt template (a built-in name or a format string) and its instruction.
    answer_tokens: tuple[str, ...] | None = None
    score_template: str | None = None
    score_instruction: str | None = None

    @classmethod
    def from_json(cls, text: str) -> PoolerConfig:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"--pooler-config is not JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data) -> PoolerConfig:
        if not isinstance(data, dict):
            raise ConfigError("--pooler-config must be a JSON object")
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(data) - known):
            raise ConfigError(f"--pooler-config has unknown keys {unknown}; known: {sorted(known)}")
        if data.get("pooling_type") is not None and not isinstance(data["pooling_type"],
                                                                   PoolingType):
            name = str(data["pooling_type"]).upper()
            try:
                data["pooling_type"] = PoolingType[name]
            except KeyError:
                raise ConfigError(f"pooling_type {name!r} is not one of "
                                  f"{[p.name for p in PoolingType]}") from None
        for key in ("returned_token_ids", "answer_tokens"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
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
        answers = self.answer_tokens
        if answers is not None and (len(answers) not in (1, 2) or not all(
                isinstance(a, str) and a for a in answers)):
            raise ConfigError("pooler config answer_tokens must be two tokens: the false answer, "
                              'then the true one, e.g. ["no", "yes"]; or the true one alone, '
                              'e.g. ["Yes"]')
        for name in ("score_template", "score_instruction"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"pooler config {name} must be a string")
        r = self.quantization_range
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0):
            raise ConfigError("pooler config quantization_range must be a positive number")
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


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the engine, and how much work may wait. The offline API has
    none (it slices its own calls); the server sets them from its flags. None: unlimited."""

    max_concurrent_requests: int | None = None
    max_queue_seconds: float | None = None
    max_inputs_per_request: int | None = None
    max_chars_per_input: int | None = None
    max_chars_per_request: int | None = None
    max_image_bytes: int | None = None
    max_image_pixels: int | None = None
    max_response_bytes: int | None = None

    def check_inputs(self, count: int) -> None:
        """The input-count limit (score: the pairs), checked before inputs are even decoded."""
        limit = self.max_inputs_per_request
        if limit is not None and count > limit:
            raise TooLargeError(f"the request has {count} inputs, more than the server's "
                                  f"limit of {limit} (--max-inputs-per-request): split it")

    def check_token_ids(self, counts: list[int]) -> None:
        """Token-id inputs count against the character limits, one per id."""
        per_input, total = self.max_chars_per_input, self.max_chars_per_request
        if per_input is not None and counts and max(counts) > per_input:
            raise TooLargeError(f"a token-id input has {max(counts)} ids, more than the "
                                  f"server's limit of {per_input} (--max-chars-per-input)")
        if total is not None and sum(counts) > total:
            raise TooLargeError(f"the request has {sum(counts)} token ids in all, more than "
                                  f"the server's limit of {total} (--max-chars-per-request)")

    def check_texts(self, texts, prefix: str = "") -> None:
        """Character limits, before tokenizing: each text with the prompt prefixed to it, and
        all of them together."""
        per_input, total = self.max_chars_per_input, self.max_chars_per_request
        if per_input is None and total is None:
            return
        count = 0
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                continue
            chars = len(prefix) + len(text)
            if per_input is not None and chars > per_input:
                what = f"input {i} with its prompt" if prefix else f"input {i}"
                raise TooLargeError(f"{what} has {chars} characters, more than the server's "
                                      f"limit of {per_input} (--max-chars-per-input)")
            count += chars
        if total is not None and count > total:
            raise TooLargeError(f"the request has {count} characters in all (prompts "
                                  f"included), more than the server's limit of {total} "
                                  "(--max-chars-per-request): split it")


@dataclass(frozen=True)
class EngineConfig:
    """Settings of the engine, in the offline API and in `poolsvc serve` alike."""

    models: tuple[ModelSpec, ...] = option(
        "[NAME=]PATH_OR_HUB_ID of a model to serve (a Sentence-Transformers or Hugging Face "
        "directory, or a hub id); repeat to serve several, the first is the default. "
        f"Default: the bundled all-MiniLM-L6-v2 ({BUNDLED_MODEL})",
        default=(ModelSpec(BUNDLED_MODEL),),
        meta={"flag": "--model", "repeat": ModelSpec.parse, "metavar": "[NAME=]PATH_OR_HUB_ID"})
    pooler_configs: tuple[PoolerOverride, ...] = option(
        "[NAME=]JSON pooling overrides, e.g. '{\"pooling_type\": \"MEAN\", \"normalize\": false}'; "
        "keys: pooling_type, normalize, activation, step_tag_id, returned_token_ids, "
        "enable_chunked_processing, max_embed_len, quantization_range, answer_tokens, "
        "score_template, score_instruction. Without NAME it applies to every model; "
        "repeatable", default=(),
        meta={"flag": "--pooler-config", "repeat": PoolerOverride.parse,
              "metavar": "[NAME=]JSON"})
    loras: tuple[LoraSpec, ...] = option(
        "NAME=PATH of a LoRA adapter (a peft directory: adapter_config.json and "
        "adapter_model.safetensors) served with the default model; requests select it by its "
        "name in `adapter` (HTTP: `model`). Repeatable; one batch mixes adapters", default=(),
        meta={"flag": "--lora", "repeat": LoraSpec.parse, "metavar": "NAME=PATH"})
    device: str = option("torch device: auto (cuda when available), cpu, cuda, cuda:N",
                         default="auto")
    dtype: str = option("compute dtype: auto (float32 on CPU, float16 on CUDA), float32, "
                        "float16, bfloat16", default="auto", meta={"choices": DTYPES})
    max_batch_tokens: int = option("token budget of one device batch (inputs are packed, so this "
                                   "counts real tokens, not padding)", default=16384)
    max_batch_inputs: int = option("most inputs in one device batch", default=512)
    disable_kernels: bool = option("run PyTorch ops instead of poolsvc's fast paths (the Triton "
                                   "kernels of kernels/ on CUDA; linear.cpp's or oneDNN's "
                                   "fused products and attention.cpp on the CPU), to bisect a "
                                   "numerical difference",
                                   default=False)
    auto_truncate: bool = option("truncate over-long inputs when a request does not say; "
                                 "without it they are rejected with INVALID_ARGUMENT",
                                 default=False)
    allow_pickle_weights: bool = option(
        "load pickled PyTorch .bin checkpoints when a model has no safetensors (unsafe for "
        "untrusted models: unpickling can run code)", default=False)
    threads: int = option("torch CPU threads (0: one per core)", default=0)
    max_model_len: int = option("longest input in tokens, below the model's own maximum (0: the "
                                "model's maximum)", default=0)

    def __post_init__(self):
        if not self.models:
            raise ConfigError("serve at least one model")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"served model names must be unique, got {names}: use NAME=PATH")
        adapters = [a.name for a in self.loras]
        if len(set(adapters)) != len(adapters):
            raise ConfigError(f"--lora names must be unique, got {adapters}")
        if clash := sorted(set(adapters) & set(names)):
            raise ConfigError(f"--lora names {clash} are also model names; name adapters apart")
        for override in self.pooler_configs:
            if override.model and override.model not in names:
                raise ConfigError(f"--pooler-config names model {override.model!r}, which is "
                                  f"not served; served: {', '.join(names)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("max_batch_tokens", "max_batch_inputs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.threads < 0:
            raise ConfigError("--threads must be 0 (auto) or more")
        if self.max_model_len < 0:
            raise ConfigError("--max-model-len must be 0 (the model's maximum) or more")

    def pooler_config(self, model: str) -> PoolerConfig:
        """The overrides for one served model: those for every model, then its own."""
        config = PoolerConfig()
        for override in sorted(self.pooler_configs, key=lambda o: bool(o.model)):
            if override.model in ("", model):
                config = config.merged(override.config)
        return config

    @property
    def engine_config(self) -> EngineConfig:
        """Only the engine's settings (a server config carries more)."""
        if type(self) is EngineConfig:
            return self
        return EngineConfig(**{f.name: getattr(self, f.name)
                               for f in dataclasses.fields(EngineConfig)})
