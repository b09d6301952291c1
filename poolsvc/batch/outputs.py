"""Where `run-batch` writes, each output able to resume from a checkpoint: an append-only
JSON lines file (batch output, and the error file) cut back to its committed length; a
pre-allocated .npy whose rows past the checkpoint are simply written again;
Parquet as one part file per chunk, joined into the output at the end.

Every `sync` makes what was written durable (fsync) before the checkpoint may count it.
A row that failed holds NaN in a float .npy, 0 in an integer one, and null in Parquet; the
error file says which rows failed and why."""

from __future__ import annotations

import os
import shutil

import numpy as np

from poolsvc.batch.checkpoint import ResumeError, fsync_directory


class LinesFile:
    """An append-only file of lines, resumed at its committed length (a partial tail written
    after the last checkpoint is cut off)."""

    def __init__(self, path: str, committed_bytes: int):
        self.path = path
        mode = "r+b" if os.path.exists(path) else "w+b"
        self._file = open(path, mode)
        self._file.seek(0, os.SEEK_END)
        if self._file.tell() < committed_bytes:
            raise ResumeError(f"{path} is shorter ({self._file.tell()} bytes) than its "
                              f"checkpoint says ({committed_bytes}); pass --overwrite to start "
                              "over")
        self._file.truncate(committed_bytes)
        self._file.seek(committed_bytes)
        if mode == "w+b":
            fsync_directory(path)

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def sync(self) -> int:
        """Flushes to disk; returns the committed length."""
        self._file.flush()
        os.fsync(self._file.fileno())
        return self._file.tell()

    def close(self) -> None:
        self._file.close()


def empty_row(dtype: np.dtype) -> float | int:
    """What a failed row holds in a .npy: NaN for floats, 0 for integer dtypes."""
    return np.nan if np.issubdtype(dtype, np.floating) else 0


class NpyFile:
    """A [rows, width] .npy, allocated up front (numpy's open_memmap writes the header and sizes
    the file) and written in place: each chunk's rows at their offset, with pwrite rather than
    through the map, so that the process's resident memory does not grow with the output."""

    def __init__(self, path: str, rows: int, width: int, dtype: np.dtype, fresh: bool):
        self.path = path
        if fresh:
            array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, width))
        else:
            try:
                array = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise ResumeError(f"{path} cannot be resumed ({exc}); pass --overwrite to "
                                  "start over") from None
            if array.shape != (rows, width) or array.dtype != dtype:
                raise ResumeError(f"{path} holds {array.shape} {array.dtype}, not the "
                                  f"({rows}, {width}) {dtype} this run writes; pass "
                                  "--overwrite to start over")
        self._offset, self._row_bytes = array.offset, width * np.dtype(dtype).itemsize
        del array
        self._fd = os.open(path, os.O_RDWR)
        if fresh:
            fsync_directory(path)

    def write(self, start: int, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows).tobytes()
        at = self._offset + start * self._row_bytes
        while data:
            written = os.pwrite(self._fd, data, at)
            data, at = data[written:], at + written

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)


class ParquetParts:
    """A Parquet output built as one part file per chunk in OUTPUT.parts/ (each written aside
    and renamed, so a part is whole or absent), joined into OUTPUT by `finish`."""

    def __init__(self, path: str, committed_parts: int, id_type=None):
        import pyarrow as pa

        self.path = path
        self.directory = path + ".parts"
        self.parts = committed_parts
        self._id_type = id_type or pa.int64()
        os.makedirs(self.directory, exist_ok=True)
        for name in os.listdir(self.directory):  # parts (or pieces) past the checkpoint
            if not name.startswith("part-") or self._index(name) >= committed_parts:
                os.remove(os.path.join(self.directory, name))
        missing = [i for i in range(committed_parts)
                   if not os.path.exists(self._part(i))]
        if missing:
            raise ResumeError(f"{self.directory} lacks committed part {missing[0]}; pass "
                              "--overwrite to start over")

    @staticmethod
    def _index(name: str) -> int:
        stem = name.removeprefix("part-").removesuffix(".parquet")
        return int(stem) if stem.isdigit() else 1 << 62

    def _part(self, index: int) -> str:
        return os.path.join(self.directory, f"part-{index:06d}.parquet")

    def write(self, ids: list, rows: np.ndarray, failed: np.ndarray) -> None:
        """One chunk: `ids`, the [n, width] `rows`, and which rows failed (null embedding)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        width = rows.shape[1]
        values = pa.array(rows.reshape(-1))
        embedding = pa.FixedSizeListArray.from_arrays(values, width,
                                                      mask=pa.array(failed, pa.bool_()))
        table = pa.table({"id": pa.array(ids, self._id_type), "embedding": embedding})
        tmp = self._part(self.parts) + ".tmp"
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self._part(self.parts))
        self.parts += 1

    def sync(self) -> int:
        fsync_directory(self._part(0))
        return self.parts

    def finish(self) -> None:
        """Joins the parts into the output, a part at a time, and removes them."""
        import pyarrow.parquet as pq

        tmp = self.path + ".tmp"
        writer = None
        for i in range(self.parts):
            table = pq.read_table(self._part(i))
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
        if writer is None:
            raise ResumeError("no rows were written")
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_directory(self.path)
        shutil.rmtree(self.directory)
