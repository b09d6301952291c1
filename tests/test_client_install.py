"""`pip install ./clients/python` alone gives a working client: a fresh venv without torch or
the server package calls every RPC, blocking and asyncio, with the same results as here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import client_every_rpc
import numpy as np
import pytest
from conftest import ROOT


def close(got, want, path="") -> None:
    """Equal JSON, numbers within float tolerance."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for key in want:
            close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            close(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-4), path
    else:
        assert got == want, path


@pytest.mark.timeout(600)
def test_the_client_alone_in_a_fresh_venv(tmp_path, examples_server, example_models):
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # `pip install ./clients/python` from a copy: setuptools builds in the source tree, and the
    # test leaves the checkout as it found it
    shutil.copytree(ROOT / "clients" / "python", tmp_path / "clients" / "python",
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "./clients/python"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    print(f"venv + pip install ./clients/python: {time.monotonic() - started:.1f}s")
    installed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"],
                               capture_output=True, text=True, check=True, timeout=120)
    names = {p["name"].lower() for p in json.loads(installed.stdout)}
    assert "poolsvc-client" in names
    assert not names & {"torch", "poolsvc", "grpcio-health-checking"}, names

    # run from outside the repository, so only the installed copy can be imported
    done = subprocess.run([str(python), str(ROOT / "tests" / "client_every_rpc.py"),
                           examples_server.address], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    close(got, client_every_rpc.main(examples_server.address))  # as the dev venv's client sees it
    close(got["async"], {**got["sync"], "errors": got["async"]["errors"]})

    sync = got["sync"]
    assert sync["health"] == "SERVING"
    assert [m["name"] for m in sync["list_models"]] == list(example_models)
    assert sync["embed"]["shape"] == [3, 384] and sync["embed 64 float16"]["shape"] == [1, 64]
    assert sync["embed 64 float16"]["dtype"] == "float16"
    assert sync["classify"]["labels"] == ["negative", "neutral", "positive"]
    assert np.allclose(np.sum(sync["classify"]["probs"]["values"], axis=1), 1, atol=1e-5)
    ranked = sync["rerank"]
    scores = sync["score cross-encoder"]["values"]
    assert [r["index"] for r in ranked] == list(np.argsort(scores)[::-1][:2])
    assert ranked[0]["document"] == client_every_rpc.DOCS[ranked[0]["index"]]
    ids = sync["tokenize"]
    assert [e["shape"] for e in sync["encode token_embed"]] == [[len(ids[0]), 384],
                                                                [len(ids[1]), 384]]
    assert [len(v["token_ids"]) for v in sync["embed_sparse"]] == [4, 4]
    assert all(len(v["tokens"]) == 4 and v["dimensions"] == 30522 for v in sync["embed_sparse"])
    tagged = sync["classify_tokens"]
    assert [len(t["offsets"]) for t in tagged] == [len(i) for i in ids[:2]]
    assert tagged[0]["labels"] == ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    (index, failed) = sync["embed_stream errors"][1]
    assert index == 1 and failed["error"] == "INVALID_ARGUMENT" and "no inputs" in failed["details"]
    errors = sync["errors"]
    assert errors["unknown model"]["error"] == "NOT_FOUND"
    assert "'nope' is not served" in errors["unknown model"]["details"]
    assert "unknown dtype='int4'" in errors["dtype"] and "'ubinary'" in errors["dtype"]
    assert "unknown task='rerank'" in errors["task"] and "'token_embed'" in errors["task"]
    assert got["async"]["errors"]["classify on an embedder"]["error"] == "INVALID_ARGUMENT"
