"""poolsvc.ray.PoolsvcEmbedder in Ray Data's map_batches on a local two-CPU Ray cluster: a
Parquet dataset embedded by actors and written as Parquet equals the offline API's vectors.
Ray is a test dependency (the test extra installs it): without it this fails, never skips."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT

TEXTS = [json.loads(line)["text"] for line in
         (ROOT / "bench" / "data" / "queries.jsonl").read_text().splitlines()[:40]]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


def test_map_batches_embeds_a_parquet_dataset(ray_cluster, tmp_path, llm):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from poolsvc.ray import PoolsvcEmbedder

    ray = ray_cluster
    source = tmp_path / "in"
    source.mkdir()
    pq.write_table(pa.table({"text": TEXTS, "doc_id": list(range(len(TEXTS)))}),
                   source / "part-0.parquet", row_group_size=16)
    ds = ray.data.read_parquet(str(source))
    ds = ds.map_batches(PoolsvcEmbedder, batch_size=16, concurrency=1, num_cpus=1,
                        fn_constructor_kwargs={"threads": 1})
    ds.write_parquet(str(tmp_path / "out"))

    table = pq.read_table(tmp_path / "out").sort_by("doc_id")
    assert table.column("text").to_pylist() == TEXTS  # the input's columns are kept
    vectors = np.stack([np.asarray(v, np.float32) for v in table.column("embedding").to_pylist()])
    want = np.array([o.outputs.embedding for o in llm.embed(TEXTS)])
    assert vectors.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(vectors, want, atol=1e-5)


def test_a_batch_without_the_column_says_which_to_pass():
    from poolsvc.ray import PoolsvcEmbedder

    embedder = PoolsvcEmbedder(threads=1)
    try:
        out = embedder({"text": np.array(["a", "b"]), "n": np.array([1, 2])})
        assert out["embedding"].shape == (2, 384) and list(out["n"]) == [1, 2]
        with pytest.raises(KeyError, match="column='passage'|pass column="):
            embedder({"passage": np.array(["a"])})
        with pytest.raises(ValueError, match="row 1 .* no text"):
            embedder({"text": np.array(["a", ""])})
    finally:
        embedder.llm.close()
