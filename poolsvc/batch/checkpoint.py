"""The resume state of `run-batch`: one small JSON file beside the output (OUTPUT.checkpoint.json)
saying how much of the input is committed (rows, and where the input, the output and the error
file stood then) and which settings and input produced it.

It is replaced atomically (written aside, fsync'd, renamed, the directory fsync'd) and only
after the output bytes it counts are fsync'd, so after a kill at any point the checkpoint never
claims more than the disk holds; whatever lies past it is a partial write, cut off on resume."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

_VERSION = 1
_SAMPLE = 1 << 16  # bytes hashed at each end of the input


class ResumeError(Exception):
    """The output cannot be resumed as asked; the message says what to do instead."""


def input_identity(path: str) -> dict[str, object]:
    """What tells that the input is the file an earlier run read: its size, modification time
    and a hash of its first and last 64 KiB."""
    stat = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_SAMPLE))
        if stat.st_size > _SAMPLE:
            f.seek(max(_SAMPLE, stat.st_size - _SAMPLE))
            digest.update(f.read())
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256_ends": digest.hexdigest()}


@dataclass
class Checkpoint:
    """What is committed. `rows`: input rows (lines) done; `input_offset`: the byte where the
    next row starts (JSON lines, text); `output_bytes` / `errors_bytes`: the committed length of
    the output (JSON lines) and of the error file; `parts`: Parquet part files committed."""

    settings: dict[str, str]
    source: dict[str, object]
    created: int                    # when the first run began (Unix seconds): response bodies
    rows: int = 0
    input_offset: int = 0
    output_bytes: int = 0
    errors_bytes: int = 0
    parts: int = 0
    done: bool = False
    extra: dict[str, object] = field(default_factory=dict)

    def differences(self, settings: dict[str, str], source: dict[str, object]) -> list[str]:
        """How a new run's settings and input differ from this checkpoint's, one phrase each."""
        out = [f"--{k.replace('_', '-')} was {self.settings.get(k)!r}, now {v!r}"
               for k, v in settings.items() if self.settings.get(k) != v]
        out += [f"--{k.replace('_', '-')} was {v!r}, now unset" for k, v in self.settings.items()
                if k not in settings]
        if source != self.source:
            out.append("the input file changed (size, modification time or contents)")
        return out


def load(path: str) -> Checkpoint | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ResumeError(f"{path} is not a run-batch checkpoint ({exc}); pass --overwrite to "
                          "start over") from None
    if not isinstance(data, dict) or data.pop("version", None) != _VERSION:
        raise ResumeError(f"{path} was written by another poolsvc version; pass --overwrite "
                          "to start over")
    return Checkpoint(**data)


def save(path: str, checkpoint: Checkpoint) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"version": _VERSION, **dataclasses.asdict(checkpoint)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path)


def fsync_directory(path: str) -> None:
    """Makes a rename or a new file in `path`'s directory durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
