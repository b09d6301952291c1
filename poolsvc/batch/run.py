"""`poolsvc run-batch`: the loop, and the resume rules.

The engine runs in this process. The input is read ahead in a background thread; each chunk of
rows is submitted as soon as it is read, and the previous chunk's results are written while the
engine computes it. A chunk is committed in input order: its output bytes fsync'd, then the
checkpoint replaced (checkpoint.py), so a run killed at any point, SIGKILL included, is continued
by the same command, and the output holds every row once, in order.

A run refuses to touch an output it did not write (no checkpoint), or to continue one written
with other settings or from another input (the checkpoint's fingerprint): --overwrite starts
over.

Test hook: POOLSVC_BATCH_FAULT=kill-mid-write:N makes the N-th chunk of this run write half of
its output and then SIGKILL the process (a partial write past the checkpoint);
stop-after-commit:N makes the process SIGSTOP itself after its N-th commit, for a test to kill."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import time
from collections import deque
from dataclasses import dataclass

from poolsvc.batch import checkpoint as ckpt
from poolsvc.batch.config import BatchConfig, InputFormat, OutputFormat
from poolsvc.batch.inputs import Chunk, count_rows, read_chunks
from poolsvc.batch.openai import BatchFileRequests
from poolsvc.batch.outputs import LinesFile, NpyFile, ParquetParts
from poolsvc.batch.progress import Progress
from poolsvc.batch.texts import TextEmbedder
from poolsvc.engine.config import ConfigError
from poolsvc.engine.engine import Engine

log = logging.getLogger("poolsvc.batch")
FAULT_VARIABLE = "POOLSVC_BATCH_FAULT"


class BatchError(Exception):
    """run-batch cannot go on; the message says what to do."""


@dataclass(frozen=True)
class Summary:
    rows: int        # rows committed by this run
    errors: int      # of which failed
    tokens: int
    seconds: float   # from the first chunk read to the output finished (model loading excluded)


def run_batch(config: BatchConfig) -> Summary:
    state = _checkpoint(config)
    if state.done:
        log.info("%s is already complete (%d rows); pass --overwrite to compute it again",
                 config.output, state.rows)
        return Summary(0, 0, 0, 0.0)
    total = count_rows(config)
    if total == 0:
        raise BatchError(f"{config.input} has no rows")
    if state.rows:
        log.info("resuming %s at row %d of %d", config.output, state.rows, total)
    engine = Engine(config.engine_config)
    engine.start()
    try:
        return _Run(config, engine, state, total).run()
    except ckpt.ResumeError as exc:
        raise BatchError(str(exc)) from None
    finally:
        engine.shutdown(discard=True)


def _checkpoint(config: BatchConfig) -> ckpt.Checkpoint:
    """The checkpoint to continue from: a new one (saved before any output exists), or the
    earlier run's, which must have the same settings and input."""
    paths = [config.output, config.errors_path, config.output + ".parts", config.output + ".tmp"]
    if config.overwrite:
        _remove([*paths, config.checkpoint_path])
    settings, source = config.fingerprint_settings(), ckpt.input_identity(config.input)
    try:
        state = ckpt.load(config.checkpoint_path)
    except ckpt.ResumeError as exc:
        raise BatchError(str(exc)) from None
    if state is not None and state.rows == 0 and not state.done:
        # nothing committed: begin again, whatever the settings (a run that failed to start)
        _remove(paths)
        state = None
    elif state is None:
        if existing := [p for p in paths if os.path.exists(p)]:
            raise BatchError(f"{existing[0]} exists and has no run-batch checkpoint "
                             f"({config.checkpoint_path}); pass --overwrite to replace it")
    if state is None:
        state = ckpt.Checkpoint(settings, source, created=int(time.time()))
        ckpt.save(config.checkpoint_path, state)
        return state
    if changes := state.differences(settings, source):
        raise BatchError(f"cannot resume {config.output}: it was begun with other settings or "
                         f"input ({'; '.join(changes)}). Run the same command to resume it, or "
                         "pass --overwrite to start over")
    return state


def _remove(paths: list[str]) -> None:
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


class _Run:
    def __init__(self, config: BatchConfig, engine: Engine, state: ckpt.Checkpoint, total: int):
        self.config, self.engine, self.state, self.total = config, engine, state, total
        self.fault = _Fault.from_environment()
        self.errors_written = 0
        self.commits = 0
        fresh = state.rows == 0
        try:
            self.errors = LinesFile(config.errors_path, state.errors_bytes)
            if config.output_format is OutputFormat.BATCH_JSONL:
                digest = hashlib.sha256(json.dumps([state.settings, state.source],
                                                   sort_keys=True).encode()).hexdigest()
                self.work = BatchFileRequests(engine, digest[:16], state.created)
                self.sink = LinesFile(config.output, state.output_bytes)
            else:
                self.work = TextEmbedder(engine, config.dimensions, config.out_dtype)
                if config.output_format is OutputFormat.NPY:
                    self.sink = NpyFile(config.output, total, self.work.width, self.work.dtype,
                                        fresh)
                else:
                    self.sink = ParquetParts(config.output, state.parts, self._id_type())
        except ImportError:
            raise ConfigError("Parquet output needs pyarrow: pip install 'poolsvc[parquet]'") \
                from None

    def _id_type(self):
        import pyarrow as pa
        if not self.config.id_field:
            return pa.int64()
        if self.config.input_format is InputFormat.PARQUET:
            import pyarrow.parquet as pq
            return pq.ParquetFile(self.config.input).schema_arrow.field(self.config.id_field).type
        return pa.string()

    def run(self) -> Summary:
        start = time.monotonic()
        progress = Progress(self.total, self.state.rows, self.config.progress_seconds)
        rows_before = self.state.rows
        pending: deque = deque()
        try:
            for chunk in read_chunks(self.config, self.state.rows, self.state.input_offset):
                pending.append((chunk, self.work.submit(chunk)))
                if len(pending) > 1:  # write the previous chunk while the engine runs this one
                    self._commit(*pending.popleft(), progress)
            while pending:
                self._commit(*pending.popleft(), progress)
            self._finish()
        finally:
            progress.close()
        return Summary(self.state.rows - rows_before, self.errors_written, progress.tokens,
                       time.monotonic() - start)

    def _commit(self, chunk: Chunk, pending, progress: Progress) -> None:
        result = self.work.collect(chunk, pending)
        kill = self.fault.kill_mid_write(self.commits + 1)
        if self.config.output_format is OutputFormat.BATCH_JSONL:
            data = result.data[:len(result.data) // 2] if kill else result.data
            self.sink.write(data)
            errors = [(chunk.rows[i], custom_id, reason) for i, custom_id, reason in result.errors]
        else:
            rows = result.rows[:len(result.rows) // 2 or 1] if kill else result.rows
            if isinstance(self.sink, NpyFile):
                self.sink.write(chunk.rows[0].index, rows)
            else:
                ids = [row.id if self.config.id_field else row.index for row in chunk.rows]
                self.sink.write(ids, result.rows, result.failed)
            errors = [(chunk.rows[i], None, reason) for i, reason in result.errors]
        for row, custom_id, reason in errors:
            record = {"row": row.index, **({"line": row.line} if row.line else {}),
                      **({"custom_id": custom_id} if custom_id else {}), "error": reason}
            self.errors.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        if kill:
            self.sink.sync()
            self.errors.sync()
            os.kill(os.getpid(), signal.SIGKILL)
        # durable first, then counted
        if isinstance(self.sink, LinesFile):
            self.state.output_bytes = self.sink.sync()
        elif isinstance(self.sink, ParquetParts):
            self.state.parts = self.sink.sync()
        else:
            self.sink.sync()
        self.state.errors_bytes = self.errors.sync()
        self.state.rows = chunk.rows[-1].index + 1
        self.state.input_offset = chunk.end_offset
        ckpt.save(self.config.checkpoint_path, self.state)
        self.commits += 1
        self.errors_written += len(errors)
        progress.update(len(chunk.rows), result.tokens)
        if self.fault.stop_after_commit(self.commits):
            os.kill(os.getpid(), signal.SIGSTOP)

    def _finish(self) -> None:
        if isinstance(self.sink, ParquetParts):
            self.sink.finish()
        else:
            self.sink.close()
        self.errors.close()
        errors_left = os.path.getsize(self.config.errors_path)
        if errors_left == 0:
            os.remove(self.config.errors_path)
        self.state.done = True
        ckpt.save(self.config.checkpoint_path, self.state)
        failed = self._count_errors() if errors_left else 0
        log.info("wrote %s: %d rows%s", self.config.output, self.state.rows,
                 f", {failed} failed (listed in {self.config.errors_path})" if failed else "")

    def _count_errors(self) -> int:
        with open(self.config.errors_path, "rb") as f:
            return sum(1 for _ in f)


@dataclass(frozen=True)
class _Fault:
    """The test hook (module docstring): which commit of this run to kill in, or stop after."""

    kind: str = ""
    at: int = 0

    @classmethod
    def from_environment(cls) -> _Fault:
        value = os.environ.get(FAULT_VARIABLE, "")
        if not value:
            return cls()
        kind, _, at = value.partition(":")
        if kind not in ("kill-mid-write", "stop-after-commit") or not at.isdigit():
            raise BatchError(f"{FAULT_VARIABLE}={value!r}: expected kill-mid-write:N or "
                             "stop-after-commit:N")
        return cls(kind, int(at))

    def kill_mid_write(self, commit: int) -> bool:
        return self.kind == "kill-mid-write" and commit == self.at

    def stop_after_commit(self, commit: int) -> bool:
        return self.kind == "stop-after-commit" and commit == self.at
