"""What a served model is and serves: a plain value built once at load from its files, its
backend's declared capabilities and the server's pooling overrides. The pooler reads its defaults
from it; the service builds ModelInfo from it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from poolsvc.engine.config import PoolerConfig
from poolsvc.engine.errors import AdapterNotFoundError, InvalidInputError, quoted
from poolsvc.engine.params import (
    Activation,
    EmbeddingType,
    LateInteraction,
    PoolingType,
    Splade,
    Task,
)

if TYPE_CHECKING:
    from poolsvc.engine.reranker import ScoreTemplate


class Kind(enum.Enum):
    EMBEDDING = "embedding"        # a body: hidden states, pooled into embeddings
    DUAL_ENCODER = "dual-encoder"  # CLIP / SigLIP: text and image towers into one space
    CLASSIFIER = "classifier"      # a head on one pooled row per sequence
    REWARD = "reward"              # a head on every token
    SPARSE = "sparse"              # a masked LM's vocabulary logits per token, SPLADE-pooled
    MULTI_VECTOR = "multi-vector"  # ColBERT: a projected, normalized vector per token (MaxSim)


@dataclass(frozen=True)
class AdapterInfo:
    """A LoRA adapter served with a model (--lora)."""

    name: str
    source: str                      # its directory
    rank: int
    target_modules: tuple[str, ...]  # the kinds of layer it changes: "query", "v_proj" ...


@dataclass(frozen=True)
class ModelDescription:
    name: str
    aliases: tuple[str, ...]
    source: str
    is_default: bool
    kind: Kind
    architecture: str
    implementation: str            # "poolsvc" (own packed code) or "transformers", +"kernels"
    device: str
    compute_dtype: str
    hidden_size: int
    embed_dimensions: int          # after Sentence-Transformers Dense modules, if any
    has_dense: bool
    max_input_tokens: int
    vocab_size: int
    modalities: tuple[str, ...]
    image_tokens: int              # what one image costs in the batch token budget
    uses_token_types: bool         # pair encodings pass token type ids (BERT segments)
    head_pooling: PoolingType | None  # what the checkpoint's head reads; None: no head
    default_pooling: PoolingType   # a body's pooling without Sentence-Transformers files
    st_pooling: PoolingType | None  # the Sentence-Transformers Pooling module's mode
    st_normalize: bool             # Sentence-Transformers Normalize module (default on)
    labels: tuple[str, ...]
    problem_type: str | None
    score_activation: Activation | None  # a CrossEncoder's configured activation_fn
    pooler_config: PoolerConfig
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    matryoshka_dimensions: tuple[int, ...] = ()
    logit_scale_and_bias: tuple[float, float] | None = None  # dual encoders' logits
    score_template: ScoreTemplate | None = None  # LLM rerankers: how a pair is written
    splade: Splade | None = None   # sparse models: the SPLADE pooling's strategy and activation
    # multi-vector models: how queries and documents are encoded and scored
    late_interaction: LateInteraction | None = None
    # BGE-M3: the width of its token vectors (colbert_linear); 0 for other models
    multi_vector_dimensions: int = 0
    # LoRA adapters served with this model (--lora); adapter slot i + 1 is adapters[i]
    adapters: tuple[AdapterInfo, ...] = ()

    def adapter_slot(self, name: str) -> int:
        """The slot of the adapter a request names (0, the base model, for ""); raises
        AdapterNotFoundError naming the served adapters."""
        if not name:
            return 0
        for slot, adapter in enumerate(self.adapters, start=1):
            if adapter.name == name:
                return slot
        served = ", ".join(a.name for a in self.adapters) or "none"
        raise AdapterNotFoundError(f"adapter {quoted(name)} is not served with model "
                                   f"{self.name!r}; its adapters: {served} (adapters load at "
                                   "start: --lora NAME=PATH, or LLM(loras={NAME: PATH}))")

    # --- tasks -----------------------------------------------------------------------------------

    @property
    def bge_m3(self) -> bool:
        """Dense, sparse and multi-vector embeddings from one forward pass (BGE-M3's heads)."""
        return self.multi_vector_dimensions > 0

    @property
    def embedding_types(self) -> frozenset[EmbeddingType]:
        """The embeddings Embed can return."""
        if self.bge_m3:
            return frozenset(EmbeddingType)
        if self.kind is Kind.SPARSE:
            return frozenset({EmbeddingType.SPARSE})
        if Task.EMBED in self.tasks:
            return frozenset({EmbeddingType.DENSE})
        return frozenset()

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def tasks(self) -> tuple[Task, ...]:
        if self.kind is Kind.EMBEDDING:
            return (Task.EMBED, Task.SCORE, Task.TOKEN_EMBED)
        if self.kind is Kind.DUAL_ENCODER:
            return (Task.EMBED, Task.SCORE)
        if self.kind is Kind.REWARD:
            return (Task.REWARD, Task.TOKEN_CLASSIFY)
        if self.kind is Kind.SPARSE:
            return (Task.EMBED,)  # sparse vectors over the vocabulary
        if self.kind is Kind.MULTI_VECTOR:  # a vector per token; scores by MaxSim
            return (Task.TOKEN_EMBED, Task.SCORE)
        if self.score_template is not None:  # an LLM reranker scores pairs, as it was prompted
            return (Task.SCORE,)
        if self.head_pooling is PoolingType.ALL:  # a token classifier (NER): labels per token
            return (Task.TOKEN_CLASSIFY,)
        tasks = [Task.CLASSIFY]
        if self.num_labels == 1:
            tasks.append(Task.SCORE)  # a cross-encoder
        if self.head_pooling is PoolingType.LAST:  # decoder heads read any token
            tasks.append(Task.TOKEN_CLASSIFY)
        return tuple(tasks)

    @property
    def default_task(self) -> Task:
        """The task Encode runs when a request names none: the raw per-token output if the
        model has one."""
        per_token = [t for t in self.tasks if t.per_token]
        return per_token[0] if per_token else self.tasks[0]

    @property
    def scores_by_cosine(self) -> bool:
        """Score embeds both sides and takes the cosine (bi-encoders), rather than running a
        cross-encoder's head on each pair."""
        return self.kind in (Kind.EMBEDDING, Kind.DUAL_ENCODER)

    def check_task(self, task: Task) -> None:
        if task not in self.tasks:
            raise InvalidInputError(
                f"model {self.name} ({self.kind.value}) does not serve {task.value}; it serves "
                f"{', '.join(t.value for t in self.tasks)}")

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None:
            return
        allowed = self.matryoshka_dimensions
        if not 1 <= dimensions <= self.embed_dimensions:
            raise InvalidInputError(f"dimensions must be between 1 and {self.embed_dimensions} "
                                    f"for {self.name}, got {dimensions}")
        if allowed and dimensions not in allowed:
            raise InvalidInputError(f"{self.name} supports dimensions "
                                    f"{', '.join(map(str, allowed))}; got {dimensions}")

    # --- pooling defaults, in precedence: server --pooler-config, model files, the model -------

    @property
    def pooling_type(self) -> PoolingType:
        """The pooling of sequence tasks (embed, classify, score); a reward model's per-token
        pooling, since it serves no sequence task."""
        if self.kind is Kind.REWARD:
            return self.token_pooling
        if self.kind is Kind.DUAL_ENCODER:
            return PoolingType.CLS  # the towers pool themselves (CLIP: end-of-text, class token)
        if self.kind is Kind.SPARSE:
            return PoolingType.SPLADE
        if self.kind is Kind.MULTI_VECTOR:
            return PoolingType.ALL
        configured = self.pooler_config.pooling_type
        if configured is not None and not configured.per_token:
            return configured
        if self.kind is Kind.EMBEDDING:
            return self.st_pooling or self.default_pooling
        return self.head_pooling

    @property
    def token_pooling(self) -> PoolingType:
        return PoolingType.STEP if self.pooler_config.pooling_type is PoolingType.STEP \
            else PoolingType.ALL

    @property
    def step_tag_id(self) -> int | None:
        return self.pooler_config.step_tag_id

    @property
    def returned_token_ids(self) -> tuple[int, ...] | None:
        return self.pooler_config.returned_token_ids

    @property
    def normalize_default(self) -> bool:
        if self.kind is Kind.SPARSE:
            return False  # weights over the vocabulary, as SparseEncoder gives them
        configured = self.pooler_config.normalize
        return self.st_normalize if configured is None else configured

    @property
    def classify_activation(self) -> Activation:
        """transformers' problem types: regression is raw, multi-label and single-logit heads
        are sigmoids, the rest softmax (vLLM's classification default)."""
        if self.problem_type == "regression":
            return Activation.IDENTITY
        if self.problem_type == "multi_label_classification" or self.num_labels == 1:
            return Activation.SIGMOID
        return Activation.SOFTMAX

    def activation(self, task: Task, requested: bool | None) -> Activation:
        """The activation a request gets: the request's choice, then the server's, then the
        task's default for this model."""
        wanted = requested if requested is not None else self.pooler_config.activation
        if task is Task.SCORE:
            # A cross-encoder's configured activation_fn, else sigmoid for its one logit even
            # when trained as a regression (CrossEncoder.predict and vLLM do the same).
            default = self.score_activation or Activation.SIGMOID
        elif task is Task.REWARD:
            # Outcome rewards are raw; process rewards per step are probabilities (vLLM's PRM).
            step = self.token_pooling is PoolingType.STEP
            default = Activation.SOFTMAX if step else Activation.IDENTITY
            if wanted is True and default is Activation.IDENTITY:
                return self.classify_activation
        else:
            default = self.classify_activation
        return Activation.IDENTITY if wanted is False else default

    @property
    def chunk_size(self) -> int | None:
        """Embed inputs are cut into chunks of this many tokens (chunked processing), or None."""
        return self.max_input_tokens if self.pooler_config.enable_chunked_processing else None

    @property
    def max_chunked_tokens(self) -> int:
        """With chunked processing: the longest input accepted."""
        return self.pooler_config.max_embed_len or 16 * self.max_input_tokens
