"""The thread that owns the device: takes batches from the work queue, runs them, delivers."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from queue import Queue

import torch

from poolsvc.engine.batcher import next_batch
from poolsvc.engine.errors import DeadlineExceededError, UnavailableError
from poolsvc.engine.request import Sequence, now_ns

log = logging.getLogger(__name__)

# (model name, sequences, tokens, seconds on the device) after every batch, on the runner thread.
BatchObserver = Callable[[str, int, int, float], None]


class WorkQueue:
    """Waiting sequences, one FIFO per model; the model whose oldest sequence waited longest
    goes next, so one busy model cannot starve another."""

    def __init__(self, max_tokens: int, max_seqs: int):
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self._waiting: dict[str, deque[Sequence]] = {}
        self._cond = threading.Condition()
        self._closed = False
        # batches, sequences and tokens run; expired: sequences dropped past their deadline
        self.stats = Counter()

    @property
    def depth(self) -> int:
        """Sequences waiting (not counting the batch on the device and the prefetched one)."""
        return sum(len(q) for q in self._waiting.values())

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
                    batch, expired = next_batch(oldest, self.max_tokens, self.max_seqs, now_ns())
                    self.expire(expired)
                    if batch:
                        return batch
                    continue  # only dropped sequences were there
                if self._closed:
                    return None
                self._cond.wait()

    def expire(self, expired: list[Sequence]) -> None:
        self.stats.update(expired=len(expired))
        for req in {id(s.request): s.request for s in expired}.values():
            req.resolve(error=DeadlineExceededError(
                f"the deadline passed after {(now_ns() - req.arrival_ns) / 1e6:.0f} ms, before "
                "the request reached the device; it was not computed"))

    def close(self, discard: bool = False) -> None:
        """No more puts; the runner drains what waits, or with `discard` it is failed now."""
        with self._cond:
            self._closed = True
            dropped = [seq for queue in self._waiting.values() for seq in queue] if discard else []
            if discard:
                self._waiting.clear()
            self._cond.notify_all()
        for req in {id(s.request): s.request for s in dropped}.values():
            req.resolve(error=UnavailableError("the server shut down before this request ran; "
                                               "retry on another replica"))


class ModelRunner:
    """One thread owns the device: batch = ready.get(); out = run(batch); deliver(batch, out).

    A second thread forms the next batch and builds its tensors (pinned and copied on CUDA)
    while the current one runs; `ready` holds one such prefetched batch.
    """

    def __init__(self, queue: WorkQueue, on_batch: BatchObserver | None = None):
        self.queue = queue
        self.on_batch = on_batch
        self._ready: Queue = Queue(maxsize=1)
        self._threads = [threading.Thread(target=self._prefetch, name="poolsvc-batcher",
                                          daemon=True),
                         threading.Thread(target=self._run, name="poolsvc-runner", daemon=True)]

    def start(self, threads: int) -> None:
        self.threads = threads
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        for thread in self._threads:
            if thread.ident is not None:  # started
                thread.join()

    def _prefetch(self) -> None:
        while (batch := self.queue.take()) is not None:
            try:
                self._ready.put((batch, prepare(batch)))
            except Exception as exc:
                fail(batch, exc)
        self._ready.put(None)

    def _run(self) -> None:
        torch.set_num_threads(self.threads)  # this thread's OpenMP team: the only one
        while (item := self._ready.get()) is not None:
            batch, packed = item
            # Callers may have given up while the batch waited here: drop their work.
            live, expired = next_batch(deque(batch), 1 << 62, len(batch), now_ns())
            self.queue.expire(expired)
            if len(live) < len(batch):
                if not live:
                    continue
                batch, packed = live, prepare(live)
            tokens = sum(s.num_tokens for s in batch)
            self.queue.stats.update(batches=1, sequences=len(batch), tokens=tokens)
            started = time.perf_counter()
            try:
                deliver(batch, run(batch, packed))
            except Exception as exc:  # a bug or a device fault: fail this batch, keep serving
                fail(batch, exc)
            if self.on_batch is not None:
                self.on_batch(batch[0].request.model.name, len(batch), tokens,
                              time.perf_counter() - started)


def fail(batch: list[Sequence], exc: Exception) -> None:
    log.exception("batch of %d sequences failed", len(batch), exc_info=exc)
    for req in {id(s.request): s.request for s in batch}.values():
        req.resolve(error=exc)


def prepare(batch: list[Sequence]):
    """The batch's device tensors, built on the host and copied once."""
    return batch[0].request.model.prepare(batch)


def run(batch: list[Sequence], prepared) -> list[torch.Tensor]:
    """The batch on the device; outputs on the host, one per sequence, in batch order."""
    started = now_ns()
    for seq in batch:
        if not seq.request.started_ns:
            seq.request.started_ns = started
    return batch[0].request.model.compute(batch, prepared)


def deliver(batch: list[Sequence], outputs: list[torch.Tensor]) -> None:
    for seq, out in zip(batch, outputs):
        req = seq.request
        if req.add(seq, out) and not req.cancelled:
            try:
                req.resolve(req.plan.finish(req))
            except Exception as exc:
                log.exception("finishing a %s request failed", req.plan.task.value)
                req.resolve(error=exc)
