"""The engine's state of a request in flight: `Request` (token ids, timestamps, the rows computed
so far, the future that receives the result) and `Sequence`, one input or chunk of one, the unit
the batcher packs."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import torch

from poolsvc.engine.params import Timing
from poolsvc.engine.pooler import PoolerOptions
from poolsvc.engine.request import PoolingRequest, now_ns


@dataclass(eq=False)
class Request:
    """The engine's state of one PoolingRequest, from tokenization to its future's result.

    `token_ids` are what the model sees per input (per pair for cross-encoders); `options`
    how each is pooled on the device. Score by cosine embeds every query and document once and
    pairs them as `pairs` (documents numbered after the queries); `logit` is a dual encoder's
    (scale, bias) when its logits were asked for instead of the cosine. Multi-vector models:
    `attended` counts, per input, the tokens attended to (None: all), `kept` the rows each
    input's output keeps (None: all), and `maxsim` ("sum" or "mean") is how Score reduces a
    pair's token similarities."""

    call: PoolingRequest
    model_name: str
    options: PoolerOptions
    token_ids: list[list[int]]
    token_type_ids: list[list[int]] | None = None
    pixels: list[torch.Tensor | None] | None = None  # per input: an image's [3, H, W] pixels
    image_tokens: int = 0                # what one image costs in the token budget
    chunk_size: int | None = None        # longer inputs are split into chunks of this size
    labels: tuple[str, ...] = ()
    pairs: tuple[tuple[int, int], ...] = ()
    logit: tuple[float, float] | None = None
    token_strings: Callable[[Any], list[str]] | None = None  # sparse models: return_tokens
    offsets: list[list[tuple[int, int]]] | None = None  # Encode's return_offsets, per input
    attended: list[int | None] | None = None
    kept: list[Any] | None = None        # per input: numpy row indices, or None
    maxsim: str | None = None
    m3: Any = None                       # BGE-M3 outputs: their M3Layout (engine/bge_m3.py)
    adapter: int = 0                     # the slot of its LoRA adapter (0: the base model)
    tokenized_ns: int = field(default_factory=now_ns)
    started_ns: int = 0
    future: Future = field(default_factory=Future)
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

    @property
    def deadline_ns(self) -> int | None:
        return self.call.deadline_ns

    @property
    def num_tokens(self) -> int:
        """What the request costs in batch token budgets: its tokens, images at their cost."""
        images = 0 if self.pixels is None else sum(p is not None for p in self.pixels)
        return sum(map(len, self.token_ids)) + images * self.image_tokens

    def chunked(self, i: int) -> bool:
        """Whether input `i` runs as several chunks (chunked processing of long inputs)."""
        return self.chunk_size is not None and len(self.token_ids[i]) > self.chunk_size

    def sequences(self) -> list[Sequence]:
        seqs = []
        for i, ids in enumerate(self.token_ids):
            if self.pixels is not None and self.pixels[i] is not None:
                seqs.append(Sequence(self, i, ids, self.options, None, self.pixels[i],
                                     self.image_tokens))
            elif self.chunked(i):
                types = self.token_type_ids[i] if self.token_type_ids is not None else None
                raw = self.options.for_chunks()
                for start in range(0, len(ids), self.chunk_size):
                    end = start + self.chunk_size
                    seqs.append(Sequence(self, i, ids[start:end], raw,
                                         types[start:end] if types else None))
            else:
                types = self.token_type_ids[i] if self.token_type_ids is not None else None
                attended = self.attended[i] if self.attended is not None else None
                seqs.append(Sequence(self, i, ids, self.options, types, attended=attended))
        self.remaining = len(seqs)
        return seqs

    def add(self, seq: Sequence, output: torch.Tensor) -> bool:
        """Records one sequence's output (on the host); True when the request is complete.
        Chunks of one input are summed weighted by their token counts, then averaged (raw: the
        output step finishes the mean with the request's options)."""
        i = seq.index
        if not self.chunked(i):
            self.rows[i] = output
        else:
            weight, previous = seq.num_tokens, self.rows[i]
            self.rows[i] = output * weight if previous is None else previous + output * weight
            self._weights[i] += weight
            if self._weights[i] == len(self.token_ids[i]):
                self.rows[i] = self.rows[i] / self._weights[i]
        self.remaining -= 1
        return self.remaining == 0

    def timing(self, done_ns: int) -> Timing:
        return Timing(queue_ns=self.started_ns - self.tokenized_ns,
                      tokenization_ns=self.tokenized_ns - self.call.arrival_ns,
                      inference_ns=done_ns - self.started_ns,
                      total_ns=done_ns - self.call.arrival_ns)

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
    options: PoolerOptions               # how its rows are pooled on the device
    token_type_ids: list[int] | None = None
    pixels: torch.Tensor | None = None   # an image input instead of tokens
    image_tokens: int = 0                # its cost in the batch's token budget
    attended: int | None = None          # how many of its first tokens are attended to

    @property
    def num_tokens(self) -> int:
        return self.image_tokens if self.pixels is not None else len(self.token_ids)

