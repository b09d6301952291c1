"""The batching decision, without a model."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from types import SimpleNamespace

from poolsvc.engine.batcher import next_batch
from poolsvc.engine.state import Sequence

NOW = 1_000_000


def seqs(*lengths: int, cancelled: bool = False, deadline: int | None = None) -> list[Sequence]:
    future = Future()
    if cancelled:
        future.cancel()
    request = SimpleNamespace(cancelled=future.cancelled(), deadline_ns=deadline)
    return [Sequence(request, i, [0] * n, None) for i, n in enumerate(lengths)]


def take(waiting, max_tokens=100, max_seqs=100) -> list[int]:
    batch, expired = next_batch(waiting, max_tokens, max_seqs, NOW)
    assert not expired
    return [s.num_tokens for s in batch]


def lengths(items) -> list[int]:
    return [s.num_tokens for s in items]


def test_packs_real_tokens_up_to_the_budget():
    waiting = deque(seqs(10, 20, 30, 40))
    assert take(waiting, max_tokens=60) == [10, 20, 30]
    assert lengths(waiting) == [40]


def test_exact_fit_and_order_kept():
    waiting = deque(seqs(30, 30, 1))
    assert take(waiting, 60) == [30, 30]
    assert take(waiting, 60) == [1]
    assert not waiting


def test_stops_at_the_sequence_cap():
    waiting = deque(seqs(*[1] * 10))
    assert len(take(waiting, 1000, 4)) == 4
    assert len(waiting) == 6


def test_does_not_skip_ahead_past_a_big_sequence():
    """FIFO: a small later sequence does not jump a big one that does not fit (no starvation)."""
    waiting = deque(seqs(50, 40, 5))
    assert take(waiting, 60) == [50]
    assert lengths(waiting) == [40, 5]


def test_first_sequence_always_runs():
    assert take(deque(seqs(500)), 100) == [500]


def test_cancelled_requests_are_dropped():
    waiting = deque(seqs(10, 10, cancelled=True) + seqs(7) + seqs(9, cancelled=True) + seqs(3))
    assert take(waiting) == [7, 3]
    assert not waiting


def test_only_cancelled_gives_an_empty_batch():
    waiting = deque(seqs(5, 5, cancelled=True))
    assert take(waiting) == []
    assert not waiting


def test_past_deadline_sequences_are_returned_not_run():
    late = seqs(8, 8, deadline=NOW)
    waiting = deque(seqs(4, deadline=NOW + 1) + late + seqs(6))
    batch, expired = next_batch(waiting, 100, 100, NOW)
    assert lengths(batch) == [4, 6]
    assert expired == late
    assert not waiting


def test_dropped_sequences_do_not_use_the_budget():
    waiting = deque(seqs(90, cancelled=True) + seqs(90, deadline=0) + seqs(60, 40))
    batch, expired = next_batch(waiting, 100, 100, NOW)
    assert lengths(batch) == [60, 40] and lengths(expired) == [90]
