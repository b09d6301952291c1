"""The batching decision, without a model."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from types import SimpleNamespace

from poolsvc.engine.batcher import next_batch
from poolsvc.engine.request import Sequence


def seqs(*lengths: int, cancelled: bool = False) -> list[Sequence]:
    future = Future()
    if cancelled:
        future.cancel()
    request = SimpleNamespace(cancelled=future.cancelled())
    return [Sequence(request, i, [0] * n) for i, n in enumerate(lengths)]


def lengths(batch: list[Sequence]) -> list[int]:
    return [s.num_tokens for s in batch]


def test_packs_real_tokens_up_to_the_budget():
    waiting = deque(seqs(10, 20, 30, 40))
    assert lengths(next_batch(waiting, max_tokens=60, max_seqs=100)) == [10, 20, 30]
    assert lengths(waiting) == [40]


def test_exact_fit_and_order_kept():
    waiting = deque(seqs(30, 30, 1))
    assert lengths(next_batch(waiting, 60, 100)) == [30, 30]
    assert lengths(next_batch(waiting, 60, 100)) == [1]
    assert not waiting


def test_stops_at_the_sequence_cap():
    waiting = deque(seqs(*[1] * 10))
    assert len(next_batch(waiting, 1000, 4)) == 4
    assert len(waiting) == 6


def test_does_not_skip_ahead_past_a_big_sequence():
    """FIFO: a small later sequence does not jump a big one that does not fit (no starvation)."""
    waiting = deque(seqs(50, 40, 5))
    assert lengths(next_batch(waiting, 60, 100)) == [50]
    assert lengths(waiting) == [40, 5]


def test_first_sequence_always_runs():
    waiting = deque(seqs(500))
    assert lengths(next_batch(waiting, 100, 100)) == [500]


def test_cancelled_requests_are_dropped():
    waiting = deque(seqs(10, 10, cancelled=True) + seqs(7) + seqs(9, cancelled=True) + seqs(3))
    assert lengths(next_batch(waiting, 100, 100)) == [7, 3]
    assert not waiting


def test_only_cancelled_gives_an_empty_batch():
    waiting = deque(seqs(5, 5, cancelled=True))
    assert next_batch(waiting, 100, 100) == []
    assert not waiting
