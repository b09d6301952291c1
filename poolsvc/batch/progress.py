"""How far `run-batch` is: on a terminal a progress bar (rows, tokens/s, ETA); otherwise a plain
line on stderr (through logging) every --progress-seconds, and one at the end."""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta

log = logging.getLogger("poolsvc.batch")


class Progress:
    def __init__(self, total_rows: int, done_rows: int, interval: float, tty: bool | None = None):
        self.total, self.done = total_rows, done_rows
        self.interval = interval
        self.tokens = 0
        self._rows_now = 0  # rows this run (the rate excludes a resumed run's earlier rows)
        self._start = self._last = time.monotonic()
        self._bar = None
        if tty if tty is not None else sys.stderr.isatty():
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total_rows, initial=done_rows, unit="row", desc="run-batch",
                             dynamic_ncols=True, file=sys.stderr)

    def update(self, rows: int, tokens: int) -> None:
        self.done += rows
        self._rows_now += rows
        self.tokens += tokens
        now = time.monotonic()
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.tokens / max(now - self._start, 1e-9):,.0f} tok/s",
                                      refresh=False)
            self._bar.update(rows)
        elif now - self._last >= self.interval:
            self._last = now
            log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        seconds = max(now - self._start, 1e-9)
        rate = self._rows_now / seconds
        eta = timedelta(seconds=round((self.total - self.done) / rate)) if rate else "?"
        share = 100 * self.done / self.total if self.total else 100.0
        return (f"{self.done:,}/{self.total:,} rows ({share:.1f}%), {self.tokens:,} tokens, "
                f"{self.tokens / seconds:,.0f} tokens/s, {rate:,.1f} rows/s, ETA {eta}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            log.info("done: %s", self.line(time.monotonic()))
