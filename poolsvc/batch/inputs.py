"""Reading `run-batch`'s input as a stream of chunks of rows, from any row on (resume): JSON
lines, plain text lines and Parquet row groups. Only a chunk at a time is held; a background
thread reads (and parses) the next chunks while the engine computes.

A row is a line of a line-based file (a JSON line's text under --field, a .txt line, or an
OpenAI batch request line) or a Parquet row. A row that cannot be read (not JSON, no such
field, not a string, empty) carries its reason instead of a text; the run goes on."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from poolsvc.batch.config import BatchConfig, InputFormat, OutputFormat
from poolsvc.engine.config import ConfigError

_READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class Row:
    index: int                # 0-based input row
    line: int | None          # 1-based line number (line-based inputs)
    text: str | None          # the text to embed, or an OpenAI batch request line
    id: object = None         # the --id-field value (texts to embed)
    error: str | None = None  # why the row has no text


@dataclass(frozen=True)
class Chunk:
    rows: list[Row]
    end_offset: int           # the input byte where the next chunk starts (line-based inputs)


def count_rows(config: BatchConfig) -> int:
    """The input's rows: its lines (a last line without a newline counts), or Parquet's
    metadata row count (once its columns are checked)."""
    if config.input_format is InputFormat.PARQUET:
        file = _parquet_file(config.input)
        names = file.schema_arrow.names
        for name in filter(None, (config.field, config.id_field)):
            if name not in names:
                flag = "--field" if name == config.field else "--id-field"
                raise ConfigError(f"{config.input} has no column {name!r} ({flag}); its "
                                  f"columns: {', '.join(names)}")
        return file.metadata.num_rows
    lines, last = 0, b"\n"
    with open(config.input, "rb") as f:
        while block := f.read(_READ_BLOCK):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def read_chunks(config: BatchConfig, start_row: int, start_offset: int) -> Iterator[Chunk]:
    """Chunks of `config.chunk_rows` rows from `start_row` (at byte `start_offset` of a
    line-based input), read ahead in a background thread."""
    if config.input_format is InputFormat.PARQUET:
        chunks = _parquet_chunks(config, start_row)
    else:
        chunks = _line_chunks(config, start_row, start_offset)
    return _read_ahead(chunks, depth=2)


def _line_chunks(config: BatchConfig, start_row: int, start_offset: int) -> Iterator[Chunk]:
    raw = config.output_format is OutputFormat.BATCH_JSONL
    parse = _text_line if config.input_format is InputFormat.TEXT else _json_line
    offset, index, rows = start_offset, start_row, []
    with open(config.input, "rb") as f:
        f.seek(start_offset)
        for line in f:
            offset += len(line)
            body = line.rstrip(b"\n").removesuffix(b"\r")
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as exc:
                rows.append(Row(index, index + 1, None, error=f"not UTF-8 text ({exc.reason} at "
                                                              f"byte {exc.start})"))
            else:
                rows.append(Row(index, index + 1, text) if raw else
                            parse(index, text, config.field, config.id_field))
            index += 1
            if len(rows) == config.chunk_rows:
                yield Chunk(rows, offset)
                rows = []
    if rows:
        yield Chunk(rows, offset)


def _text_line(index: int, text: str, field: str, id_field: str) -> Row:
    if not text.strip():
        return Row(index, index + 1, None, error="empty line: no text to embed")
    return Row(index, index + 1, text)


def _json_line(index: int, text: str, field: str, id_field: str) -> Row:
    line = index + 1
    if not text.strip():
        return Row(index, line, None, error="empty line: expected a JSON object")
    try:
        obj = json.loads(text)
    except ValueError as exc:
        return Row(index, line, None, error=f"not JSON: {exc}")
    if not isinstance(obj, dict):
        return Row(index, line, None, error=f"expected a JSON object with {field!r}, got "
                                            f"{type(obj).__name__}")
    row_id = None
    if id_field:
        row_id = obj.get(id_field)
        row_id = None if row_id is None else str(row_id)
    return _checked(index, line, obj.get(field, _MISSING), field, row_id)


_MISSING = object()


def _checked(index: int, line: int | None, value, field: str, row_id) -> Row:
    if value is _MISSING:
        return Row(index, line, None, row_id, f"no field {field!r} (set --field to the key "
                                              "that holds the text)")
    if not isinstance(value, str):
        return Row(index, line, None, row_id, f"field {field!r} is "
                                              f"{type(value).__name__}, not text")
    if not value.strip():
        return Row(index, line, None, row_id, f"field {field!r} is empty: no text to embed")
    return Row(index, line, value, row_id)


def _parquet_file(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("Parquet input and output need pyarrow: pip install "
                          "'poolsvc[parquet]'") from None
    return pq.ParquetFile(path)


def _parquet_chunks(config: BatchConfig, start_row: int) -> Iterator[Chunk]:
    """Row groups from the one holding `start_row`, read `chunk_rows` rows at a time."""
    file = _parquet_file(config.input)
    first, skip = 0, start_row
    meta = file.metadata
    while first < meta.num_row_groups and skip >= meta.row_group(first).num_rows:
        skip -= meta.row_group(first).num_rows
        first += 1
    columns = [config.field] + ([config.id_field] if config.id_field else [])
    index, rows = start_row, []
    groups = list(range(first, meta.num_row_groups))
    for batch in file.iter_batches(batch_size=config.chunk_rows, row_groups=groups,
                                   columns=columns):
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if config.id_field else [None] * len(texts)
        for text, row_id in zip(texts[skip:], ids[skip:]):
            if text is None:
                rows.append(Row(index, None, None, row_id, f"column {config.field!r} is null"))
            else:
                rows.append(_checked(index, None, text, config.field, row_id))
            index += 1
            if len(rows) == config.chunk_rows:
                yield Chunk(rows, 0)
                rows = []
        skip = 0
    if rows:
        yield Chunk(rows, 0)


_DONE = object()


def _read_ahead(chunks: Iterator[Chunk], depth: int) -> Iterator[Chunk]:
    """`chunks`, produced by a daemon thread at most `depth` ahead of the consumer."""
    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for chunk in chunks:
                while not stop.is_set():
                    try:
                        ahead.put(chunk, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            ahead.put(exc)
            return
        ahead.put(_DONE)

    thread = threading.Thread(target=produce, name="run-batch-reader", daemon=True)
    thread.start()
    try:
        while (item := ahead.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
