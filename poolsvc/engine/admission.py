"""Admission: whether the engine takes a request, decided before any work is done on it (before
it is even decoded, for the server): how many requests are in flight, and how many seconds of
work are already waiting. Work is counted in tokens (an estimate until the request is tokenized)
and turned into seconds at the rate the device has been running, so a server sheds load by what
is queued on the machine it runs on, not by a request count tuned for another."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from poolsvc.engine.config import Limits
from poolsvc.engine.errors import OverloadedError

# Queued work drains in full batches, so it is timed at the best rate the device has recently
# shown (small batches of light traffic run far below it); that best rate halves every
# _HALF_LIFE seconds, so a slower device (contention, a bigger model's traffic) is noticed.
_HALF_LIFE = 60.0


@dataclass(eq=False)
class Ticket:
    """One admitted request: the tokens it is counted as, until it is answered."""

    tokens: int
    released: bool = False


class Admission:
    def __init__(self, limits: Limits):
        self.limits = limits
        self._lock = threading.Lock()
        self.in_flight = 0
        self.tokens = 0                        # of every admitted, unanswered request
        self.tokens_per_second: float | None = None  # measured on the device
        self._rated_at = 0.0

    def admit(self, deadline_ns: int | None = None) -> Ticket:
        """A ticket for a new request, or OverloadedError at once: too many requests in flight,
        too much work queued, or more queued than the call's deadline allows."""
        with self._lock:
            limit = self.limits.max_concurrent_requests
            if limit is not None and self.in_flight >= limit:
                raise OverloadedError(
                    f"{self.in_flight} requests are in flight, the server's limit "
                    f"(--max-concurrent-requests {limit}); retry with backoff or on another "
                    "replica")
            if self.in_flight:  # shedding is for load: an idle server tries every request
                self._check_queue(self._seconds(self.tokens), deadline_ns)
            self.in_flight += 1
            return Ticket(0)

    def counted_as(self, ticket: Ticket, tokens: int, deadline_ns: int | None = None) -> None:
        """The request is tokenized: count its tokens, unless the work queued ahead of it has
        grown past the limit meanwhile, or it and its own work cannot be done by its
        deadline."""
        with self._lock:
            ahead = self.tokens - ticket.tokens
            if self.in_flight > 1:
                self._check_queue(self._seconds(ahead), deadline_ns,
                                  own=self._seconds(tokens))
            if not ticket.released:
                self.tokens += tokens - ticket.tokens
                ticket.tokens = tokens

    def _check_queue(self, seconds: float, deadline_ns: int | None, own: float = 0.0) -> None:
        most = self.limits.max_queue_seconds
        if most is None:  # no shedding (the offline API): everything waits its turn
            return
        if seconds > most:
            raise OverloadedError(
                f"about {seconds:.1f} s of work is queued, more than the server's limit of "
                f"{most:g} s (--max-queue-seconds); retry with backoff or on another replica")
        if deadline_ns is not None:
            left = (deadline_ns - time.monotonic_ns()) / 1e9
            if seconds + own > left:
                raise OverloadedError(
                    f"about {seconds + own:.1f} s of work would be done before this call's "
                    f"answer, and its deadline is {max(left, 0):.1f} s away; retry with a "
                    "longer deadline or on another replica")

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            if not ticket.released:
                ticket.released = True
                self.in_flight -= 1
                self.tokens -= ticket.tokens

    def ran(self, tokens: int, seconds: float) -> None:
        """A batch of `tokens` took `seconds` on the device."""
        if tokens <= 0 or seconds <= 0:
            return
        rate, now = tokens / seconds, time.monotonic()
        with self._lock:
            best = self.tokens_per_second
            if best is not None:
                rate = max(rate, best * 0.5 ** ((now - self._rated_at) / _HALF_LIFE))
            self.tokens_per_second, self._rated_at = rate, now

    @property
    def queued_seconds(self) -> float:
        """The estimated time to answer everything admitted so far."""
        return self._seconds(self.tokens)

    def _seconds(self, tokens: int) -> float:
        rate = self.tokens_per_second
        return 0.0 if not rate else tokens / rate

