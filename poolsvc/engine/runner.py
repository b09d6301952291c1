"""The engine's threads: one owns the device; on CUDA one more forms batches from the work queue
and another turns pooled rows into outputs (on the CPU the device's thread does both)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from queue import Queue

import torch

from poolsvc.engine.batcher import next_batch
from poolsvc.engine.errors import DeadlineExceededError, UnavailableError
from poolsvc.engine.outputs import build_output
from poolsvc.engine.request import now_ns
from poolsvc.engine.served import HostRows, ServedModel
from poolsvc.engine.state import Sequence

log = logging.getLogger(__name__)

# (model name, sequences, tokens, seconds on the device) after every batch, on the runner thread.
BatchObserver = Callable[[str, int, int, float], None]


class WorkQueue:
    """Waiting sequences, one FIFO per model; the model whose oldest sequence waited longest
    goes next, so one busy model cannot starve another."""

    def __init__(self, max_tokens: int, max_seqs: int):
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self._waiting: dict[ServedModel, deque[Sequence]] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._held = 0
        # batches, sequences and tokens run; expired: sequences dropped past their deadline
        self.stats = Counter()

    @property
    def depth(self) -> int:
        """Sequences waiting (not counting the batch on the device and the prefetched one)."""
        return sum(len(q) for q in self._waiting.values())

    def put(self, model: ServedModel, seqs: list[Sequence]) -> None:
        with self._cond:
            if self._closed:
                raise UnavailableError("the server is shutting down; retry on another replica")
            self._waiting.setdefault(model, deque()).extend(seqs)
            self._cond.notify()

    def take(self) -> tuple[ServedModel, list[Sequence]] | None:
        """The next batch and its model, blocking while there is none; None once closed and
        drained."""
        with self._cond:
            while True:
                queues = [(m, q) for m, q in self._waiting.items() if q]
                if queues and not self._held:
                    model, oldest = min(queues, key=lambda mq: mq[1][0].request.tokenized_ns)
                    batch, expired = next_batch(oldest, self.max_tokens, self.max_seqs, now_ns())
                    self.expire(expired)
                    if batch:
                        return model, batch
                    continue  # only dropped sequences were there
                if self._closed and not queues:
                    return None
                self._cond.wait()

    @contextlib.contextmanager
    def held(self):
        """While held, no batch is formed: work queues up, and is batched (or dropped, if its
        deadline passed meanwhile) once released."""
        with self._cond:
            self._held += 1
        try:
            yield
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify_all()

    def expire(self, expired: list[Sequence]) -> None:
        self.stats.update(expired=len(expired))
        for req in {id(s.request): s.request for s in expired}.values():
            waited_ms = (now_ns() - req.call.arrival_ns) / 1e6
            req.resolve(error=DeadlineExceededError(
                f"the deadline passed after {waited_ms:.0f} ms, before the request reached the "
                "device; it was not computed"))

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
    """One thread owns the device: batch = next batch; out = model.compute(batch); done.put(...).

    Pipelined (CUDA): a prefetch thread forms the next batch and builds its tensors (pinned and
    copied) while the current one runs, `ready` holding one such prefetched batch; a finisher
    thread takes the pooled rows (waiting for their copy to the host) and turns finished
    requests into their outputs, so the device never waits on host post-processing.

    On the CPU the runner does all three itself: there the "device" is the same cores, a
    batch's tensors cost tens of microseconds to build, and a batch formed while the previous one
    runs holds only the requests that had arrived by then (with 64 one-text requests in flight,
    batches of about a third of them); each hand-off to another thread also costs a lone
    request a wake-up, and a finisher competes with the runner's OpenMP team for the cores.
    """

    def __init__(self, queue: WorkQueue, on_batch: BatchObserver | None = None):
        self.queue = queue
        self.on_batch = on_batch
        self._ready: Queue = Queue(maxsize=1)
        self._done: Queue = Queue()
        self._threads = [threading.Thread(target=self._prefetch, name="poolsvc-batcher",
                                          daemon=True),
                         threading.Thread(target=self._run, name="poolsvc-runner", daemon=True),
                         threading.Thread(target=self._finish, name="poolsvc-finisher",
                                          daemon=True)]

    def start(self, threads: int, pipelined: bool,
              first: Callable[[], None] = lambda: None) -> None:
        """`threads`: the runner's OpenMP team; `pipelined`: form batches and finish them on
        their own threads (devices that compute asynchronously). `first` runs on the runner's
        thread, with its team, before any batch (warm-up): start returns once it has, and
        raises what it raised."""
        self.threads = threads
        self.pipelined = pipelined
        self._first, self._first_error = first, None
        self._started = threading.Event()
        for thread in self._threads if pipelined else self._threads[1:2]:
            thread.start()
        self._started.wait()
        if self._first_error is not None:
            self.queue.close()    # the batcher thread, if any, exits
            self._done.put(None)  # and the finisher
            raise self._first_error

    def join(self) -> None:
        for thread in self._threads:
            if thread.ident is not None:  # started
                thread.join()

    def _prefetch(self) -> None:
        while (item := self.queue.take()) is not None:
            model, batch = item
            try:
                self._ready.put((model, batch, model.prepare(batch)))
            except Exception as exc:
                fail(batch, exc)
        self._ready.put(None)

    def _batches(self):
        """(model, batch, its tensors) in turn: prefetched, or formed now."""
        if self.pipelined:
            while (item := self._ready.get()) is not None:
                yield item
            return
        while (item := self.queue.take()) is not None:
            model, batch = item
            try:
                packed = model.prepare(batch)
            except Exception as exc:
                fail(batch, exc)
                continue
            yield model, batch, packed

    def _run(self) -> None:
        torch.set_num_threads(self.threads)  # this thread's OpenMP team: the only one
        try:
            self._first()
        except BaseException as exc:
            self._first_error = exc
            return
        finally:
            self._started.set()
        for model, batch, packed in self._batches():
            # Callers may have given up while the batch waited here: drop their work.
            live, expired = next_batch(deque(batch), 1 << 62, len(batch), now_ns())
            self.queue.expire(expired)
            if len(live) < len(batch):
                if not live:
                    continue
                batch, packed = live, model.prepare(live)
            tokens = sum(s.num_tokens for s in batch)
            self.queue.stats.update(batches=1, sequences=len(batch), tokens=tokens)
            started = time.perf_counter()
            for seq in batch:
                seq.request.started_ns = seq.request.started_ns or now_ns()
            try:
                host = model.compute(batch, packed)
            except Exception as exc:  # a bug or a device fault: fail this batch, keep serving
                host = None
                fail(batch, exc)
            # Counted before its callers are answered: a caller that reads the metrics after
            # its answer finds its batch in them.
            if self.on_batch is not None:
                self.on_batch(model.name, len(batch), tokens, time.perf_counter() - started)
            if host is not None:
                if self.pipelined:
                    self._done.put((batch, host))
                else:
                    deliver(batch, host)
        self._done.put(None)

    def _finish(self) -> None:
        while (item := self._done.get()) is not None:
            deliver(*item)


def deliver(batch: list[Sequence], host: HostRows) -> None:
    """Hands each finished request of `batch` its output."""
    try:
        rows = host.wait()
    except Exception as exc:
        fail(batch, exc)
        return
    for seq, row in zip(batch, rows):
        req = seq.request
        if req.add(seq, row) and not req.cancelled:
            try:
                req.resolve(build_output(req))
            except Exception as exc:
                log.exception("finishing a %s request failed", req.call.task.value)
                req.resolve(error=exc)


def fail(batch: list[Sequence], exc: Exception) -> None:
    log.exception("batch of %d sequences failed", len(batch), exc_info=exc)
    for req in {id(s.request): s.request for s in batch}.values():
        req.resolve(error=exc)
