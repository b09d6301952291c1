"""Texts to embed, a chunk at a time: the chunk's readable rows go to the engine as requests of
a few hundred texts each (all submitted at once, so they batch as one stream), and come back as
one [rows, width] array in input order, with the rows that failed marked and explained.

A request fails as a whole when one of its texts is bad (too long without --auto-truncate, say);
its texts are then sent one by one, so that only the bad row fails."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from poolsvc.batch.inputs import Chunk
from poolsvc.batch.outputs import empty_row
from poolsvc.engine.engine import Engine
from poolsvc.engine.errors import EngineError, Option
from poolsvc.engine.params import OutputDType, PoolingParams, Task
from poolsvc.engine.request import PoolingRequest

_SLICE = 256  # texts per request
# How the run-batch command line spells the options an engine error points to.
CLI_SPELLING = {
    Option.TRUNCATE: "run with --auto-truncate to cut long texts at the model's maximum",
    Option.TRUNCATE_LENGTH: "--max-model-len",
}


@dataclass
class Vectors:
    """A chunk's result: row i of `rows` is the chunk's row i (a failed row holds NaN, or 0 for
    integer dtypes); `errors` are (chunk position, reason) of the failed rows."""

    rows: np.ndarray
    failed: np.ndarray
    errors: list[tuple[int, str]]
    tokens: int


class TextEmbedder:
    def __init__(self, engine: Engine, dimensions: int, out_dtype: OutputDType):
        self.engine = engine
        self.params = PoolingParams(dimensions=dimensions or None, out_dtype=out_dtype)
        try:  # the options checked once, and the row shape learned, before any row is read
            probe = self._request(["probe"]).result()
        except EngineError as exc:
            raise EngineError(f"cannot embed with these options: "
                              f"{exc.spelled(CLI_SPELLING)}") from None
        self.width = probe.embeddings.shape[1]
        self.dtype = probe.embeddings.dtype

    def _request(self, texts: list[str]) -> Future:
        return self.engine.submit(PoolingRequest(Task.EMBED, tuple(texts), params=self.params))

    def submit(self, chunk: Chunk) -> list[tuple[list[int], Future | EngineError]]:
        """Each request of the chunk: the chunk positions it embeds, and its future (or the
        error that refused it)."""
        positions = [i for i, row in enumerate(chunk.rows) if row.error is None]
        out = []
        for start in range(0, len(positions), _SLICE):
            places = positions[start:start + _SLICE]
            out.append((places, self._submit([chunk.rows[i].text for i in places])))
        return out

    def _submit(self, texts: list[str]) -> Future | EngineError:
        try:
            return self._request(texts)
        except EngineError as exc:
            return exc

    def collect(self, chunk: Chunk, pending) -> Vectors:
        """Waits for the chunk's requests; a failed request is retried a text at a time."""
        rows = np.full((len(chunk.rows), self.width), empty_row(self.dtype), self.dtype)
        failed = np.zeros(len(chunk.rows), bool)
        errors = {i: row.error for i, row in enumerate(chunk.rows) if row.error is not None}
        tokens = 0
        for places, result in pending:
            out = _result(result)
            if isinstance(out, EngineError) and len(places) > 1:
                singles = [(i, self._submit([chunk.rows[i].text])) for i in places]
                for i, single in singles:
                    one = _result(single)
                    if isinstance(one, EngineError):
                        errors[i] = one.spelled(CLI_SPELLING)
                    else:
                        rows[i] = one.embeddings[0]
                        tokens += one.prompt_lens[0]
            elif isinstance(out, EngineError):
                errors[places[0]] = out.spelled(CLI_SPELLING)
            else:
                rows[places] = out.embeddings
                tokens += sum(out.prompt_lens)
        failed[list(errors)] = True
        return Vectors(rows, failed, sorted(errors.items()), tokens)


def _result(result: Future | EngineError):
    if isinstance(result, EngineError):
        return result
    try:
        return result.result()
    except EngineError as exc:
        return exc
