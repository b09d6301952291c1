"""Embedding a dataset with Ray Data: `PoolsvcEmbedder` is the callable class that
`Dataset.map_batches` runs, one engine per actor.

    import ray
    from poolsvc.ray import PoolsvcEmbedder

    ds = ray.data.read_parquet("s3://bucket/passages/")
    ds = ds.map_batches(PoolsvcEmbedder, fn_constructor_kwargs={"model": "BAAI/bge-m3"},
                        batch_size=1024, concurrency=4, num_gpus=1)  # num_gpus=0 on CPUs
    ds.write_parquet("s3://bucket/embeddings/")

Each actor loads the model once (in `__init__`) and embeds every batch it is given through
the offline API, adding an `embedding` column ([rows, dimensions] float32) beside the batch's
own columns. This module does not import ray: Ray imports it on its workers."""

from __future__ import annotations

import numpy as np

from poolsvc.engine.llm import LLM
from poolsvc.engine.params import PoolingParams


class PoolsvcEmbedder:
    """`model`: a directory or hub id (default: the bundled all-MiniLM-L6-v2); `column`: the
    batch column holding the texts; `output_column`: the column added; `dimensions`,
    `normalize`: as PoolingParams; `truncate_prompt_tokens`: as LLM.embed (-1: cut at the
    model's maximum; default: a longer text fails the batch). Other keyword arguments are
    LLM's (device, dtype, threads, max_model_len, pooler_config, ...)."""

    def __init__(self, model: str | None = None, *, column: str = "text",
                 output_column: str = "embedding", dimensions: int | None = None,
                 normalize: bool | None = None, truncate_prompt_tokens: int | None = None,
                 **engine_kwargs):
        self.column, self.output_column = column, output_column
        self.params = PoolingParams(dimensions=dimensions, normalize=normalize)
        self.truncate_prompt_tokens = truncate_prompt_tokens
        self.llm = LLM(model, task="embed", **engine_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.column not in batch:
            raise KeyError(f"the batch has no column {self.column!r} (columns: "
                           f"{', '.join(batch)}); pass column= to PoolsvcEmbedder")
        texts = batch[self.column].tolist()
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(f"row {bad[0]} of the batch has no text in column "
                             f"{self.column!r} ({texts[bad[0]]!r}); filter such rows out first")
        outputs = self.llm.embed(texts, self.params,
                                 truncate_prompt_tokens=self.truncate_prompt_tokens)
        vectors = np.array([o.outputs.embedding for o in outputs], dtype=np.float32)
        return {**batch, self.output_column: vectors.reshape(len(texts), -1)}
