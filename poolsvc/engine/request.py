"""Per-request state: one Request per call, one Sequence per input of it."""

from __future__ import annotations

import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from poolsvc.engine.params import EmbedParams, Task, Timing

if TYPE_CHECKING:
    from poolsvc.engine.served import ServedModel


@dataclass(eq=False)
class Request:
    """Everything about one call: its inputs as token ids, parameters, timestamps and the future
    that receives the result (from the runner thread; asyncio callers wrap it)."""

    model: ServedModel
    task: Task
    params: EmbedParams
    token_ids: list[list[int]]
    arrival_ns: int
    tokenized_ns: int
    future: Future = field(default_factory=Future)
    started_ns: int = 0
    rows: list[torch.Tensor | None] = field(init=False)
    remaining: int = field(init=False)

    def __post_init__(self):
        self.rows = [None] * len(self.token_ids)
        self.remaining = len(self.token_ids)

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()

    def sequences(self) -> list[Sequence]:
        return [Sequence(self, i, len(ids)) for i, ids in enumerate(self.token_ids)]

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
    """One input of a request: the unit the batcher packs."""

    request: Request
    index: int
    num_tokens: int

    @property
    def token_ids(self) -> list[int]:
        return self.request.token_ids[self.index]


def now_ns() -> int:
    return time.monotonic_ns()
