"""Which waiting sequences run next. A pure function, testable without a model."""

from __future__ import annotations

from collections import deque

from poolsvc.engine.request import Sequence


def next_batch(waiting: deque[Sequence], max_tokens: int, max_seqs: int) -> list[Sequence]:
    """Takes sequences from the front of `waiting` in order until the next would pass the token
    budget (packed, so the cost is the sum of real tokens) or the sequence cap.

    Sequences of cancelled requests are dropped on the way. The first live sequence is always
    taken: start-up checks that the longest allowed input fits `max_tokens`.
    """
    batch: list[Sequence] = []
    tokens = 0
    while waiting and len(batch) < max_seqs:
        seq = waiting[0]
        if seq.request.cancelled:
            waiting.popleft()
            continue
        if batch and tokens + seq.num_tokens > max_tokens:
            break
        batch.append(waiting.popleft())
        tokens += seq.num_tokens
    return batch
