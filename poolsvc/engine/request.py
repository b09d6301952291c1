"""`PoolingRequest`: the one value every front (gRPC servicers, the offline LLM) builds and hands
to the engine. Its options reach the code that uses them through engine/pooler.py."""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from poolsvc.engine.errors import InvalidInputError
from poolsvc.engine.images import ImageInput
from poolsvc.engine.params import (
    EmbeddingType,
    HybridWeights,
    InputRole,
    PoolingParams,
    PromptOptions,
    SparseOptions,
    Task,
    Truncation,
)

# An input is text, token ids from the model's tokenizer, or an image (image models).
Prompt = str | Seq[int] | ImageInput


def now_ns() -> int:
    return time.monotonic_ns()


@dataclass(frozen=True)
class PoolingRequest:
    """What a caller asks of the engine, in one value.

    `inputs` are embedded, classified or encoded; for SCORE they are the queries and `documents`
    the other side of each pair (1:N, N:1 or N:N zipped). `raw` is Encode's form of a task: each
    input's output as its own array, as vLLM's `LLM.encode` returns it. `deadline_ns`: when the
    caller stops waiting (work still queued then is dropped, not computed)."""

    task: Task
    inputs: tuple[Prompt, ...]
    documents: tuple[Prompt, ...] = ()
    model: str = ""                  # a served name or alias; "": the default model
    # a LoRA adapter served with the model (--lora); "": the base model. `model` may name an
    # adapter instead, as vLLM serves LoRA modules under their own model names.
    adapter: str = ""
    params: PoolingParams = PoolingParams()
    truncation: Truncation = Truncation()
    prompt: PromptOptions = PromptOptions()
    raw: bool = False
    sparse: SparseOptions = SparseOptions()  # sparse models' embeddings: top_k, token strings
    offsets: bool = False  # Encode, per-token outputs: each row's character span in its text
    # Multi-vector models: whether the inputs are queries or documents (None: documents); Score
    # encodes its queries and documents each as their side.
    role: InputRole | None = None
    # Models with several embeddings (BGE-M3): which ones Embed returns (empty: the model's own
    # kind), and Score's weights for mixing them (None: the dense score).
    embedding_types: frozenset[EmbeddingType] = frozenset()
    hybrid: HybridWeights | None = None
    arrival_ns: int = field(default_factory=now_ns)
    deadline_ns: int | None = None

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """SCORE: (query, document) index pairs."""
        queries, documents = len(self.inputs), len(self.documents)
        if queries == 0 or documents == 0:
            raise InvalidInputError(f"score needs at least one query and one document; got "
                                    f"{queries} queries and {documents} documents")
        if queries == 1:
            return [(0, d) for d in range(documents)]
        if documents == 1:
            return [(q, 0) for q in range(queries)]
        if queries == documents:
            return [(i, i) for i in range(queries)]
        raise InvalidInputError(
            f"cannot pair {queries} queries with {documents} documents: send 1 query and N "
            "documents, N queries and 1 document, or N of each (zipped)")
