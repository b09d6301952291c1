"""Every code block of the README, run as printed against a live server.

Python blocks run in this venv, shell blocks with bash (grpcurl from this venv's bin), both from
the repository root with three substitutions: the server's address for 127.0.0.1:50051, its
HTTP port's URL for http://127.0.0.1:8000, and a generated JPEG for cat.jpg. The server is
conftest's examples_server: the bundled embedder as the default model, and tiny stand-ins under
the names the examples use (rerank, clf, rm, clip).
JSON blocks (sample answers) must parse. Not run: the two set-up commands (tests/test_repo.py and
.ci/run hold those), blocks without a language (the flag synopsis), and blocks marked
`<!-- not run: REASON -->`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT

README = ROOT / "README.md"
BIN = Path(sys.executable).parent
_BLOCK = re.compile(r"(?:<!-- (?P<marker>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)\n```",
                    re.S)
SETUP = {"serve command", "test command"}


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    code: str
    marker: str

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.lang or 'text'})"


def blocks() -> list[Block]:
    text = README.read_text()
    return [Block(text.count("\n", 0, m.start("code")) + 1, m["lang"], m["code"],
                  m["marker"] or "") for m in _BLOCK.finditer(text)]


def runnable() -> list[Block]:
    return [b for b in blocks() if b.lang in ("python", "sh") and b.marker not in SETUP
            and not b.marker.startswith("not run:")]


@pytest.fixture(scope="module")
def cat_jpg(tmp_path_factory) -> Path:
    from tiny_models import image_bytes
    path = tmp_path_factory.mktemp("images") / "cat.jpg"
    path.write_bytes(image_bytes(64, 48, "JPEG"))
    return path


def test_every_block_is_run_or_says_why_not():
    kinds = {}
    for block in blocks():
        if block.marker.startswith("not run:"):
            assert block.marker[len("not run:"):].strip(), f"{block}: say why it is not run"
            kind = "not run"
        elif block.marker in SETUP or not block.lang:
            kind = "set-up or synopsis"
        else:
            assert block.lang in ("python", "sh", "json"), f"{block}: no runner for it"
            kind = block.lang
        kinds.setdefault(kind, []).append(block.line)
    assert len(kinds["not run"]) <= 2, kinds["not run"]  # placeholders and the benchmark only
    assert len(kinds["python"]) >= 6 and len(kinds["sh"]) >= 4


def test_json_samples_parse():
    for block in blocks():
        if block.lang == "json":
            json.loads(block.code)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("block", runnable(), ids=str)
def test_block_runs_as_printed(block, examples_server, cat_jpg):
    code = block.code.replace("127.0.0.1:50051", examples_server.address)
    code = code.replace("http://127.0.0.1:8000", examples_server.http_url)
    code = code.replace("cat.jpg", str(cat_jpg))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    if block.lang == "python":
        cmd = [sys.executable, "-c", code]
    else:
        cmd = ["bash", "-c", "set -euo pipefail\n" + code]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=220)
    assert done.returncode == 0, f"{block} failed:\n{code}\n--- stdout\n{done.stdout}\n" \
                                 f"--- stderr\n{done.stderr}"
