"""The thread that owns the device: takes batches from the work queue, runs them, delivers."""

from __future__ import annotations

import logging
import threading
from collections import deque

import torch

from poolsvc.engine.batcher import next_batch
from poolsvc.engine.errors import UnavailableError
from poolsvc.engine.outputs import EmbedOutput
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.pooling import finish_embeddings
from poolsvc.engine.request import Request, Sequence, now_ns
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


def run(batch: list[Sequence]) -> torch.Tensor:
    """Pooled rows of the batch on the host, [num_seqs, hidden] float32 (one copy per batch)."""
    model: ServedModel = batch[0].request.model
    started = now_ns()
    for seq in batch:
        if not seq.request.started_ns:
            seq.request.started_ns = started
    packed = PackedBatch.build([s.token_ids for s in batch], None, model.device,
                               model.module.position_offset)
    return model.embed(packed).cpu()


def deliver(batch: list[Sequence], pooled: torch.Tensor) -> None:
    for seq, row in zip(batch, pooled):
        req = seq.request
        req.rows[seq.index] = row
        req.remaining -= 1
        if req.remaining == 0:
            finish(req)


def finish(req: Request) -> None:
    if req.cancelled:
        return
    params = req.params
    normalize = req.model.files.normalize if params.normalize is None else params.normalize
    vectors = finish_embeddings(torch.stack(req.rows), params.dimensions, normalize)
    req.resolve(EmbedOutput.build(req.model.name, vectors, params.out_dtype, req.token_ids,
                                  req.timing(now_ns())))
