"""The Node.js client example (@grpc/grpc-js, stubs from protos/) against a live server."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
from conftest import ROOT


def test_node_example_embeds_and_reranks(server, llm):
    node = shutil.which("node")
    assert node, "Node.js is needed (the machine's node, 18 or newer)"
    assert (ROOT / "clients/node/node_modules/@grpc/grpc-js").is_dir(), \
        "run: npm ci --prefix clients/node (scripts/test-deps.sh does)"
    done = subprocess.run([node, "embed_and_rerank.js", server.address], capture_output=True,
                          text=True, timeout=120, cwd=ROOT / "clients/node")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    want = llm.embed(["Hello, my name is", "poolsvc speaks gRPC"])
    assert out["model"] == "all-MiniLM-L6-v2" and out["shape"] == [2, 384]
    np.testing.assert_allclose(out["first"], want[0].outputs.embedding[:4], atol=1e-6)
    assert abs(out["norm"] - 1.0) < 1e-5
    assert out["tokens"] == [len(o.prompt_token_ids) for o in want]
    docs = ["Cats are small furry animals.", "Paris is the capital and largest city of France.",
            "The stock market fell today."]
    scores = [o.outputs.score for o in llm.score("Where is the capital of France?", docs)]
    order = list(np.argsort(scores)[::-1][:2])
    assert [r["index"] for r in out["ranked"]] == order
    np.testing.assert_allclose([r["score"] for r in out["ranked"]],
                               [scores[i] for i in order], atol=1e-5)
    assert out["ranked"][0]["document"] == docs[order[0]]


def test_node_example_reports_errors(server):
    done = subprocess.run([shutil.which("node"), "embed_and_rerank.js", server.address, "nope"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT / "clients/node")
    assert done.returncode == 1
    assert "gRPC status 5" in done.stderr and "'nope' is not served" in done.stderr
