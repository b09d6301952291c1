"""The CPU runner forms each batch when it is free, so requests that arrive while a batch runs
join one batch (the served small-request throughput of issue 18), and the offline API takes any
number of inputs."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from tiny_models import tiny_bert

from poolsvc.engine.config import EngineConfig, ModelSpec
from poolsvc.engine.engine import Engine
from poolsvc.engine.params import Task
from poolsvc.engine.request import PoolingRequest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_path):
    return tiny_bert(tmp_path_factory.mktemp("cpu-batching") / "bert", minilm_path)


def test_requests_arriving_during_a_batch_run_as_one_batch(tiny):
    """While the runner is busy (held here in its per-batch observer), 20 one-text requests
    queue up; once it is free they run as one batch, not as a prefetched first arrival and
    then the rest."""
    running, release = threading.Event(), threading.Event()
    batches: list[int] = []

    def observe(model: str, seqs: int, tokens: int, seconds: float) -> None:
        batches.append(seqs)
        if len(batches) == 1:
            running.set()
            release.wait(30)

    engine = Engine(EngineConfig(models=(ModelSpec(str(tiny)),), device="cpu", threads=1),
                    on_batch=observe)
    engine.start()
    try:
        first = engine.submit(PoolingRequest(Task.EMBED, ("the first text",)))
        assert running.wait(30)
        later = [engine.submit(PoolingRequest(Task.EMBED, ("text number 0",)))]
        # Nothing may take it while the runner is busy; the pause only gives a batch formed
        # ahead of time (the old prefetch thread) the chance to take it alone.
        time.sleep(0.2)
        assert engine.stats["queued"] == 1
        later += [engine.submit(PoolingRequest(Task.EMBED, (f"text number {i}",)))
                  for i in range(1, 20)]
        release.set()
        first.result(30)
        outs = [f.result(30) for f in later]
    finally:
        release.set()
        engine.shutdown()
    assert batches == [1, 20]
    assert all(o.embeddings.shape == (1, 48) for o in outs)


def test_offline_api_batches_any_number_of_inputs(tiny):
    """5,000 inputs in one call (beyond the server's 2,048 per request) equal the same inputs
    embedded in calls of 250 (not a multiple of its slices)."""
    from poolsvc import LLM

    texts = [f"short query {i} about {'cats' if i % 3 else 'the weather in spring'}"
             for i in range(5000)]
    with LLM(str(tiny), device="cpu", threads=1) as llm:
        whole = np.asarray([o.outputs.embedding for o in llm.embed(texts)])
        small = np.asarray([o.outputs.embedding for start in range(0, 5000, 250)
                            for o in llm.embed(texts[start:start + 250])])
        scores = llm.score(texts[0], texts[:2500])
    assert whole.shape == (5000, 48)
    np.testing.assert_allclose(whole, small, atol=1e-5)
    assert len(scores) == 2500
