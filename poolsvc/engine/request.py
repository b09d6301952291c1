"""Per-request state: one Request per call, one or more Sequences per input of it."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from poolsvc.engine.params import Activation, OutputDType, Task, Timing

if TYPE_CHECKING:
    from poolsvc.engine.served import DevicePooler, ServedModel


@dataclass(frozen=True)
class Plan:
    """Everything resolved about how to compute a request: on the device (`pooler`) and on the
    host after it (`finish` turns the request's rows into its output)."""

    task: Task
    pooler: DevicePooler
    finish: Callable[[Request], Any]
    normalize: bool = False
    dimensions: int | None = None
    activation: Activation = Activation.IDENTITY
    out_dtype: OutputDType = OutputDType.FLOAT32
    returned_token_ids: tuple[int, ...] | None = None
    # Score with an embedding model: (query input, document input) per pair, and for CLIP /
    # SigLIP logits instead of the cosine, (scale, bias).
    pairs: tuple[tuple[int, int], ...] = ()
    logit: tuple[float, float] | None = None


@dataclass(eq=False)
class Request:
    """Everything about one call: its inputs as token ids, its plan, timestamps and the future
    that receives the result (from the runner thread; asyncio callers wrap it)."""

    model: ServedModel
    plan: Plan
    token_ids: list[list[int]]                # per input, what the model sees (usage counts)
    token_type_ids: list[list[int]] | None    # per input, for pair encodings
    arrival_ns: int
    tokenized_ns: int
    pixels: list[torch.Tensor | None] | None = None  # per input: an image's [3, H, W] pixels
    image_tokens: int = 0                     # what one image costs in the token budget
    chunk_size: int | None = None             # split longer inputs into chunks of this size
    deadline_ns: int | None = None            # dropped unrun once now_ns() passes it
    future: Future = field(default_factory=Future)
    started_ns: int = 0
    rows: list[torch.Tensor | None] = field(init=False)
    _weights: list[int] = field(init=False)
    remaining: int = field(init=False)

    def __post_init__(self):
        self.rows = [None] * len(self.token_ids)
        self._weights = [0] * len(self.token_ids)
        self.remaining = 0

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()

    def sequences(self) -> list[Sequence]:
        seqs = []
        for i, ids in enumerate(self.token_ids):
            if self.pixels is not None and self.pixels[i] is not None:
                seqs.append(Sequence(self, i, ids, None, self.pixels[i], self.image_tokens))
                continue
            types = self.token_type_ids[i] if self.token_type_ids is not None else None
            size = self.chunk_size or len(ids)
            for start in range(0, len(ids), size):
                seqs.append(Sequence(self, i, ids[start:start + size],
                                     types[start:start + size] if types else None))
        self.remaining = len(seqs)
        return seqs

    def add(self, seq: Sequence, output: torch.Tensor) -> bool:
        """Records one sequence's output; True when the request is complete. Chunks of one input
        are averaged, weighted by their token counts."""
        i, weight = seq.index, seq.num_tokens
        if seq.pixels is not None or len(self.token_ids[i]) == weight:
            self.rows[i] = output
        else:
            previous = self.rows[i]
            self.rows[i] = output * weight if previous is None else previous + output * weight
            self._weights[i] += weight
            if self._weights[i] == len(self.token_ids[i]):
                self.rows[i] = self.rows[i] / self._weights[i]
        self.remaining -= 1
        return self.remaining == 0

    def timing(self, done_ns: int) -> Timing:
        return Timing(queue_ns=self.started_ns - self.tokenized_ns,
                      tokenization_ns=self.tokenized_ns - self.arrival_ns,
                      inference_ns=done_ns - self.started_ns, total_ns=done_ns - self.arrival_ns)

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        """Sets the outcome unless the caller already gave up on it."""
        try:
            if error is None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)
        except InvalidStateError:  # cancelled meanwhile
            pass


@dataclass(eq=False, slots=True)
class Sequence:
    """One input of a request, or one chunk of a long input: the unit the batcher packs."""

    request: Request
    index: int
    token_ids: list[int]
    token_type_ids: list[int] | None = None
    pixels: torch.Tensor | None = None   # an image input instead of tokens
    image_tokens: int = 0                # its cost in the batch's token budget

    @property
    def num_tokens(self) -> int:
        return self.image_tokens if self.pixels is not None else len(self.token_ids)


def now_ns() -> int:
    return time.monotonic_ns()
