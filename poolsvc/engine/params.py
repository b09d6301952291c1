"""Enums and per-request parameters shared by the engine's parts and its callers."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from poolsvc.engine.errors import InvalidInputError


class Task(enum.Enum):
    EMBED = "embed"
    CLASSIFY = "classify"
    SCORE = "score"
    REWARD = "reward"
    TOKEN_EMBED = "token_embed"
    TOKEN_CLASSIFY = "token_classify"

    @property
    def per_token(self) -> bool:
        return self in (Task.REWARD, Task.TOKEN_EMBED, Task.TOKEN_CLASSIFY)


class PoolingType(enum.Enum):
    CLS = "CLS"
    MEAN = "MEAN"
    LAST = "LAST"
    ALL = "ALL"
    STEP = "STEP"
    MAX = "MAX"
    WEIGHTED_MEAN = "WEIGHTED_MEAN"
    MEAN_SQRT_LEN = "MEAN_SQRT_LEN"

    @property
    def per_token(self) -> bool:
        return self in (PoolingType.ALL, PoolingType.STEP)


class Activation(enum.Enum):
    """What turns a head's logits into the task's output."""

    IDENTITY = "identity"
    SIGMOID = "sigmoid"
    SOFTMAX = "softmax"
    TANH = "tanh"


class TruncationSide(enum.Enum):
    RIGHT = "right"
    LEFT = "left"


class OutputDType(enum.Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    # Delivered as the raw bits in a uint16 array: numpy has no bfloat16.
    BFLOAT16 = "bfloat16"


@dataclass(frozen=True)
class Truncation:
    """`enabled=None` defers to the server's --auto-truncate; `max_tokens` 0 or -1 = model max."""

    enabled: bool | None = None
    max_tokens: int = 0
    side: TruncationSide = TruncationSide.RIGHT

    def __post_init__(self):
        if self.max_tokens < -1:
            raise InvalidInputError(
                f"truncation max_tokens must be positive, or 0 / -1 for the model's maximum; "
                f"got {self.max_tokens}")
        if self.enabled is False and self.max_tokens > 0:
            raise InvalidInputError(
                f"truncation max_tokens={self.max_tokens} contradicts enabled=false: drop one")

    def limit(self, model_max: int, auto_truncate: bool) -> tuple[int, bool]:
        """(token limit, whether to cut rather than reject longer inputs)."""
        if self.max_tokens > model_max:
            raise InvalidInputError(
                f"truncation max_tokens={self.max_tokens} exceeds the model's maximum of "
                f"{model_max} tokens")
        cut = self.enabled if self.enabled is not None else (self.max_tokens > 0 or auto_truncate)
        return (self.max_tokens if self.max_tokens > 0 else model_max), cut


@dataclass(frozen=True)
class PromptOptions:
    """A named prompt from the model's config, or a literal prefix; not both."""

    name: str = ""
    text: str = ""

    def __post_init__(self):
        if self.name and self.text:
            raise InvalidInputError("give prompt_name or prompt, not both")


@dataclass(frozen=True)
class PoolingParams:
    """Per-request pooling options (vLLM's PoolingParams). None means the model's default.

    `normalize` applies to embedding tasks, `dimensions` to embed, `activation` to
    classification, scoring and reward tasks."""

    normalize: bool | None = None
    dimensions: int | None = None
    activation: bool | None = None
    out_dtype: OutputDType = OutputDType.FLOAT32


@dataclass(frozen=True)
class Timing:
    """Nanoseconds, as the proto's Timing."""

    queue_ns: int
    tokenization_ns: int
    inference_ns: int
    total_ns: int
