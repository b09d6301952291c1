"""Enums and per-request parameters shared by the engine's parts and its callers."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from poolsvc.engine.errors import InvalidInputError, Option


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
    # Sparse lexical vectors: a masked LM's logits per token, log(1 + relu), max over tokens.
    SPLADE = "SPLADE"

    @property
    def per_token(self) -> bool:
        return self in (PoolingType.ALL, PoolingType.STEP)


@dataclass(frozen=True)
class Splade:
    """Sentence-Transformers' SpladePooling: `strategy` "max" (SPLADE v2+) or "sum" over the
    tokens of log(1 + relu(logits)); `activation` "log1p_relu" applies log1p once more."""

    strategy: str = "max"
    activation: str = "relu"


@dataclass(frozen=True)
class SparseOptions:
    """How a sparse model's vectors are delivered: the `top_k` largest weights (0: every non-zero
    one), and the tokens' strings beside their ids if `return_tokens`."""

    top_k: int = 0
    return_tokens: bool = False

    def __post_init__(self):
        if self.top_k < 0:
            raise InvalidInputError(f"sparse_top_k must be 0 (every non-zero weight) or more; "
                                    f"got {self.top_k}")

    @property
    def requested(self) -> bool:
        return bool(self.top_k) or self.return_tokens


class InputRole(enum.Enum):
    """Which side of a late-interaction match an input is on (multi-vector models)."""

    QUERY = "query"
    DOCUMENT = "document"


@dataclass(frozen=True)
class LateInteraction:
    """A multi-vector (ColBERT) model's encoding of each side, from its Sentence-Transformers
    MultiVectorEncoder or PyLate files.

    Each side's `marker` (e.g. "[Q] ") is inserted after the first token when it is one token of
    the vocabulary, else prepended to the text. Queries are padded with the `expansion_token`
    (None: the tokenizer's mask token) to `query_length` tokens ("fixed": exactly that many, so
    longer queries are over the limit; "min": at least that many, up to `query_max`); the
    expansion tokens attend to the query but are not attended to, unless `attend_expansion`.
    Document tokens whose strings are in `skiplist` (and query tokens, if `skip_queries`) are
    dropped from the output. `mean` divides MaxSim by the query's token count ("meanmaxsim")."""

    query_marker: str = ""
    document_marker: str = ""
    query_length: int | None = None
    expansion: str = "fixed"
    expansion_token: str | None = None
    attend_expansion: bool = False
    query_max: int | None = None
    document_length: int | None = None
    skiplist: tuple[str, ...] = ()
    skip_queries: bool = False
    mean: bool = False


class EmbeddingType(enum.Enum):
    """A kind of embedding a model gives; BGE-M3 gives all three from one forward pass."""

    DENSE = "dense"
    SPARSE = "sparse"              # weights over the vocabulary (lexical weights)
    MULTI_VECTOR = "multi_vector"  # a vector per token


@dataclass(frozen=True)
class HybridWeights:
    """A hybrid score's weights, as FlagEmbedding's BGEM3FlagModel.compute_score mixes them:
    (dense * s_dense + sparse * s_sparse + multi_vector * s_colbert) / (their sum)."""

    dense: float = 0.0
    sparse: float = 0.0
    multi_vector: float = 0.0

    def __post_init__(self):
        for name in ("dense", "sparse", "multi_vector"):
            value = getattr(self, name)
            if not value >= 0:  # also refuses NaN
                raise InvalidInputError(f"hybrid_weights.{name} must be 0 or more; got {value}")
        if self.total <= 0:
            raise InvalidInputError("hybrid_weights: give at least one weight above 0 (dense, "
                                    "sparse, multi_vector)")

    @property
    def total(self) -> float:
        return self.dense + self.sparse + self.multi_vector

    @property
    def types(self) -> frozenset[EmbeddingType]:
        """The embeddings the score needs: those weighted above 0."""
        return frozenset(t for t, w in ((EmbeddingType.DENSE, self.dense),
                                        (EmbeddingType.SPARSE, self.sparse),
                                        (EmbeddingType.MULTI_VECTOR, self.multi_vector)) if w > 0)


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
    """What a request's vectors are delivered as (the formulas: engine/compact.py)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    # Delivered as the raw bits in a uint16 array: numpy has no bfloat16.
    BFLOAT16 = "bfloat16"
    INT8 = "int8"        # scalar-quantized
    UINT8 = "uint8"
    BINARY = "binary"    # packed sign bits, as int8
    UBINARY = "ubinary"  # packed sign bits, as uint8

    @property
    def compact(self) -> bool:
        """An integer or bit-packed dtype: for vectors only."""
        return self not in (OutputDType.FLOAT32, OutputDType.FLOAT16, OutputDType.BFLOAT16)


@dataclass(frozen=True)
class Truncation:
    """`enabled=None` defers to the server's --auto-truncate, unless `max_tokens` is set: any
    max_tokens turns truncation on (k keeps k tokens; -1 the model's maximum). 0: unset."""

    enabled: bool | None = None
    max_tokens: int = 0
    side: TruncationSide = TruncationSide.RIGHT

    def __post_init__(self):
        if self.max_tokens < -1:
            raise InvalidInputError(
                f"truncation max_tokens must be positive, or -1 for the model's maximum; "
                f"got {self.max_tokens}")
        if self.enabled is False and self.max_tokens:
            raise InvalidInputError(
                f"truncation max_tokens={self.max_tokens} contradicts enabled=false: drop one")

    def limit(self, model_max: int, auto_truncate: bool) -> tuple[int, bool]:
        """(token limit, whether to cut rather than reject longer inputs)."""
        if self.max_tokens > model_max:
            raise InvalidInputError(
                f"the truncation length {self.max_tokens} exceeds the model's maximum of "
                f"{model_max} tokens", option=Option.TRUNCATE_LENGTH)
        cut = self.enabled if self.enabled is not None else bool(self.max_tokens) or auto_truncate
        return (self.max_tokens if self.max_tokens > 0 else model_max), cut


@dataclass(frozen=True)
class PromptOptions:
    """A named prompt from the model's config, or a literal prefix; not both."""

    name: str = ""
    text: str = ""

    def __post_init__(self):
        if self.name and self.text:
            raise InvalidInputError("give prompt_name or prompt, not both")


@dataclass(frozen=True, init=False)
class PoolingParams:
    """Per-request pooling options, vLLM's PoolingParams. None means the model's default.

    `normalize` applies to embedding tasks, `dimensions` to embed, `activation` to
    classification, scoring and reward tasks. vLLM's spellings are accepted with its meaning:
    `use_activation` (= activation) and `truncate_prompt_tokens` (k keeps k tokens, -1 the
    model's maximum); other vLLM options are refused by name."""

    normalize: bool | None
    dimensions: int | None
    activation: bool | None
    out_dtype: OutputDType
    truncate_prompt_tokens: int | None

    def __init__(self, normalize: bool | None = None, dimensions: int | None = None,
                 activation: bool | None = None,
                 out_dtype: OutputDType | str = OutputDType.FLOAT32, *,
                 use_activation: bool | None = None,
                 truncate_prompt_tokens: int | None = None, **unknown):
        if unknown:
            raise TypeError(f"PoolingParams has no option {', '.join(sorted(unknown))}; "
                            "poolsvc's options: normalize, dimensions, activation (vLLM's "
                            "use_activation), out_dtype, truncate_prompt_tokens")
        if use_activation is not None and activation is not None and use_activation != activation:
            raise ValueError("PoolingParams: activation and use_activation disagree; give one")
        values = dict(normalize=normalize, dimensions=dimensions,
                      activation=activation if activation is not None else use_activation,
                      out_dtype=OutputDType(out_dtype),
                      truncate_prompt_tokens=truncate_prompt_tokens)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def use_activation(self) -> bool | None:
        return self.activation


@dataclass(frozen=True)
class Timing:
    """Nanoseconds, as the proto's Timing."""

    queue_ns: int
    tokenization_ns: int
    inference_ns: int
    total_ns: int
