"""`poolsvc run-batch` against the offline `LLM.embed` it must keep up with, in one run.

    python bench/run_batch.py                      # passages, the bundled model, 3 rounds
    python bench/run_batch.py --workload queries --threads 2 --repeat 5
    python bench/run_batch.py --device cuda --dtype float16

Both embed the same texts (bench/data/<workload>.jsonl, cut at the model's maximum length) in
this process with the same engine settings, each round on a freshly loaded engine: LLM.embed
over the whole list (the baseline), and run-batch reading the JSON lines file and writing a .npy
(reading, chunking, checkpointing and fsync included). Model loading is excluded from both;
rounds alternate (and which goes first) and each system's best round counts. Prints texts/s,
tokens/s and run-batch's ratio to LLM.embed.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parent / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="passages", choices=("passages", "queries"))
    parser.add_argument("--model", default=None, help="default: the bundled all-MiniLM-L6-v2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="0: one per core")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, alternating systems")
    parser.add_argument("--chunk-rows", type=int, default=4096)
    args = parser.parse_args()

    from poolsvc import LLM
    from poolsvc.batch.config import BatchConfig
    from poolsvc.batch.run import run_batch
    from poolsvc.engine.config import BUNDLED_MODEL, ModelSpec

    path = DATA / f"{args.workload}.jsonl"
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    engine = dict(device=args.device, dtype=args.dtype, threads=args.threads)
    embed_times, batch_times, tokens = [], [], 0
    with tempfile.TemporaryDirectory() as work:
        config = BatchConfig(input=str(path), output=str(Path(work) / "out.npy"),
                             models=(ModelSpec(args.model or BUNDLED_MODEL),), auto_truncate=True,
                             overwrite=True, chunk_rows=args.chunk_rows, log_level="WARNING",
                             **engine)

        def embed() -> list:
            with LLM(args.model, **engine) as llm:  # a fresh engine, as run-batch's
                start = time.perf_counter()
                outs = llm.embed(texts, truncate_prompt_tokens=-1)
                embed_times.append(time.perf_counter() - start)
            return outs

        def batch() -> None:
            summary = run_batch(config)  # loads its own engine (not timed), then runs the file
            assert summary.rows == len(texts) and summary.errors == 0
            batch_times.append(summary.seconds)

        for round_ in range(args.repeat):  # the order alternates too
            if round_ % 2:
                batch()
                outs = embed()
            else:
                outs = embed()
                batch()
        tokens = sum(len(o.prompt_token_ids) for o in outs)
        baseline = np.array([o.outputs.embedding for o in outs], np.float32)
        written = np.load(config.output)
    cosine = float((written * baseline).sum(1).min() /
                   (np.linalg.norm(written, axis=1) * np.linalg.norm(baseline, axis=1)).max())
    rows = [("LLM.embed", min(embed_times)), ("run-batch -> .npy", min(batch_times))]
    print(f"{args.workload}: {len(texts)} texts, {tokens:,} tokens; {machine(args)}")
    print(f"{'system':<20} {'texts/s':>10} {'tokens/s':>12} {'ratio':>7}")
    for name, seconds in rows:
        print(f"{name:<20} {len(texts) / seconds:>10,.1f} {tokens / seconds:>12,.0f} "
              f"{rows[0][1] / seconds:>6.2f}x")
    print(f"run-batch vectors vs LLM.embed: min cosine {cosine:.6f}")
    print("rounds (s): LLM.embed " + " ".join(f"{t:.2f}" for t in embed_times) +
          "; run-batch " + " ".join(f"{t:.2f}" for t in batch_times))


def machine(args) -> str:
    threads = args.threads or torch.get_num_threads()
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() and \
        args.device != "cpu" else f"cpu: {platform.processor() or platform.machine()}"
    return f"{device}, {threads} threads, best of {args.repeat}"


if __name__ == "__main__":
    main()
