"""Which waiting sequences run next. A pure function, testable without a model."""

from __future__ import annotations

from collections import deque

from poolsvc.engine.state import Sequence


def next_batch(waiting: deque[Sequence], max_tokens: int, max_seqs: int,
               now_ns: int) -> tuple[list[Sequence], list[Sequence]]:
    """Takes sequences from the front of `waiting` in order until the next would pass the token
    budget (packed, so the cost is the sum of real tokens) or the sequence cap.

    Sequences of cancelled requests are dropped on the way, and so are those whose deadline has
    passed: they come back as the second list, so their requests can be told. The first live
    sequence is always taken: start-up checks that the longest allowed input fits `max_tokens`.
    """
    batch: list[Sequence] = []
    expired: list[Sequence] = []
    tokens = 0
    while waiting and len(batch) < max_seqs:
        seq = waiting[0]
        request = seq.request
        if request.cancelled:
            waiting.popleft()
            continue
        if request.deadline_ns is not None and request.deadline_ns <= now_ns:
            expired.append(waiting.popleft())
            continue
        if batch and tokens + seq.num_tokens > max_tokens:
            break
        batch.append(waiting.popleft())
        tokens += seq.num_tokens
    return batch, expired
