"""What each compact output dtype keeps of retrieval quality, and of size, on the bundled model.

    python bench/compact_recall.py [--queries 1000]

Embeds the bench passages and the first N bench queries through the offline API in float32 and
in each compact dtype, searches every query over the passages, and prints recall@10 against the
float32 search (the top 10 by cosine): int8 / uint8 rank by dot product of the codes (uint8 after
centering, as int8), binary / ubinary by Hamming distance of the packed bits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from poolsvc import LLM, PoolingParams

DATA = Path(__file__).resolve().parent / "data"


def texts(name: str, limit: int | None = None) -> list[str]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()[:limit]
    return [json.loads(line)["text"] for line in lines]


def top10(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :10]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    passages, queries = texts("passages.jsonl"), texts("queries.jsonl", args.queries)
    rows = []
    with LLM(threads=args.threads) as llm:
        def embed(items, dtype):
            outs = llm.embed(items, PoolingParams(out_dtype=dtype), truncate_prompt_tokens=-1)
            return np.array([o.outputs.embedding for o in outs])

        p32, q32 = embed(passages, "float32"), embed(queries, "float32")
        truth = top10(q32 @ p32.T)
        for dtype in ("float16", "int8", "uint8", "binary", "ubinary"):
            p, q = embed(passages, dtype), embed(queries, dtype)
            if dtype == "float16":
                scores, size = q @ p.T, 2 * p.shape[1]
            elif dtype.endswith("binary"):
                shift = 128 if dtype == "binary" else 0  # back to the packed bytes
                pb = np.unpackbits((p + shift).astype(np.uint8), axis=1)
                qb = np.unpackbits((q + shift).astype(np.uint8), axis=1)
                scores = -(qb[:, None, :] != pb[None, :, :]).sum(-1)  # minus Hamming distance
                size = p.shape[1]
            else:
                center = 128 if dtype == "uint8" else 0
                scores = (q - center) @ (p - center).T
                size = p.shape[1]
            rows.append((dtype, size, recall(top10(scores), truth)))
    print(f"{len(queries)} bench queries over {len(passages)} bench passages, all-MiniLM-L6-v2, "
          "recall@10 against float32's top 10:\n")
    print("| output dtype | bytes per vector | recall@10 |")
    print("|---|---|---|")
    print(f"| float32 | {4 * p32.shape[1]} | 1.000 |")
    for dtype, size, value in rows:
        print(f"| {dtype} | {size} | {value:.3f} |")


if __name__ == "__main__":
    main()
