"""The thread that owns the device: takes batches from the work queue, runs them, delivers."""

from __future__ import annotations

import logging
import threading
from collections import deque

import torch

from poolsvc.engine.batcher import next_batch
from poolsvc.engine.errors import UnavailableError
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.request import Sequence, now_ns
from poolsvc.engine.served import ServedModel

log = logging.getLogger(__name__)


class WorkQueue:
    """Waiting sequences, one FIFO per model; the model whose oldest sequence waited longest
    goes next, so one busy model cannot starve another."""

    def __init__(self, max_tokens: int, max_seqs: int):
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self._waiting: dict[str, deque[Sequence]] = {}
        self._cond = threading.Condition()
        self._closed = False

    def put(self, seqs: list[Sequence]) -> None:
        with self._cond:
            if self._closed:
                raise UnavailableError("the server is shutting down; retry on another replica")
            self._waiting.setdefault(seqs[0].request.model.name, deque()).extend(seqs)
            self._cond.notify()

    def take(self) -> list[Sequence] | None:
        """The next batch, blocking while there is none; None once closed and drained."""
        with self._cond:
            while True:
                queues = [q for q in self._waiting.values() if q]
                if queues:
                    oldest = min(queues, key=lambda q: q[0].request.tokenized_ns)
                    batch = next_batch(oldest, self.max_tokens, self.max_seqs)
                    if batch:
                        return batch
                    continue  # only cancelled sequences were there
                if self._closed:
                    return None
                self._cond.wait()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class ModelRunner:
    """batch = queue.take(); out = run(batch); deliver(batch, out)."""

    def __init__(self, queue: WorkQueue):
        self.queue = queue
        self._thread = threading.Thread(target=self._loop, name="poolsvc-runner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _loop(self) -> None:
        while (batch := self.queue.take()) is not None:
            try:
                deliver(batch, run(batch))
            except Exception as exc:  # a bug or a device fault: fail this batch, keep serving
                log.exception("batch of %d sequences failed", len(batch))
                for req in {id(s.request): s.request for s in batch}.values():
                    req.resolve(error=exc)


def run(batch: list[Sequence]) -> list[torch.Tensor]:
    """One forward pass for the batch, then each pooler its sequences need; outputs on the host,
    one per sequence, in batch order (one device-to-host copy per pooler)."""
    model: ServedModel = batch[0].request.model
    started = now_ns()
    for seq in batch:
        if not seq.request.started_ns:
            seq.request.started_ns = started
    types = None
    if any(s.token_type_ids is not None for s in batch):
        types = [s.token_type_ids or [0] * s.num_tokens for s in batch]
    packed = PackedBatch.build([s.token_ids for s in batch], types, model.device,
                               model.module.position_offset)
    hidden = model.forward(packed)
    groups: dict = {}
    for i, seq in enumerate(batch):
        groups.setdefault(seq.request.plan.pooler, []).append(i)
    outputs: list = [None] * len(batch)
    for pooler, seqs in groups.items():
        for i, out in zip(seqs, model.pool(hidden, packed, pooler, seqs)):
            outputs[i] = out
    return outputs


def deliver(batch: list[Sequence], outputs: list[torch.Tensor]) -> None:
    for seq, out in zip(batch, outputs):
        req = seq.request
        if req.add(seq, out) and not req.cancelled:
            try:
                req.resolve(req.plan.finish(req))
            except Exception as exc:
                log.exception("finishing a %s request failed", req.plan.task.value)
                req.resolve(error=exc)
