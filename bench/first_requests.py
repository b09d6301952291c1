"""A fresh server's first requests: how much more the first text of each length costs than the
same text again, and how long the server takes to start.

    python bench/first_requests.py                        # this checkout, float32 and bfloat16
    python bench/first_requests.py --baseline ../other    # and another checkout, same run

oneDNN builds a kernel for each number of rows a product sees, for the thread count it runs
with; poolsvc builds those of short batches (up to cpu.EXACT_ROWS tokens) while it starts, on the
thread that computes. Per dtype and checkout, this starts a server (the bundled model, one
process, `--threads`), sends one text of each length from 2 to 64 tokens in a shuffled order,
then the same texts again, one at a time (bench/load_client.py); prints the start time and the
p50 and mean latency of each pass. The second pass is the baseline of the first: a server with its
kernels built answers both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import tempfile
import time
from pathlib import Path

import bench  # bench/bench.py: its server start and load client

MODEL = "bundled:all-MiniLM-L6-v2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout, measured the same way")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=2,
                        help="fresh servers per checkout and dtype, interleaved")
    args = parser.parse_args()
    roots = {"this checkout": bench.ROOT}
    if args.baseline is not None:
        roots["baseline"] = args.baseline.resolve()
    # one text per length: [CLS] + n words + [SEP] is n + 2 tokens ("word" is one token)
    texts = [" ".join(["word"] * n) for n in range(63)]
    results: dict[tuple[str, str], list] = {}
    with tempfile.TemporaryDirectory() as work:
        for round_ in range(args.rounds):
            order = texts[:]
            random.Random(round_).shuffle(order)
            texts_file = Path(work) / "texts.json"
            texts_file.write_text(json.dumps(order))
            for dtype in args.dtypes.split(","):
                for name, root in roots.items():
                    started = time.perf_counter()
                    proc, address = bench.start_server(args, MODEL, dtype,
                                                       Path(work) / "server.log", root)
                    seconds = time.perf_counter() - started
                    try:  # the texts once, then again, one request at a time
                        latencies = bench.client(address, texts_file, 1, repeat=2)["latencies"]
                    finally:
                        proc.send_signal(signal.SIGTERM)
                        proc.wait(60)
                    first, again = latencies[:len(order)], latencies[len(order):]
                    results.setdefault((name, dtype), []).append((seconds, first, again))
                    print(f"  round {round_ + 1}: {name}, {dtype}: started in {seconds:.1f} s",
                          flush=True)
    print(f"\n{len(texts)} one-text requests of 2 to 64 tokens, one at a time, on a fresh "
          f"server ({args.rounds} rounds, {args.threads} threads)")
    header = (f"{'checkout':<14} {'dtype':<9} {'start s':>8} {'1st p50 ms':>10} "
              f"{'again p50':>9} {'1st mean':>8} {'again mean':>10} {'1st/again':>9}")
    print(header)
    print("-" * len(header))
    for (name, dtype), runs in results.items():
        first = [t * 1e3 for _, f, _ in runs for t in f]
        again = [t * 1e3 for _, _, a in runs for t in a]
        start_s = statistics.median(s for s, _, _ in runs)
        print(f"{name:<14} {dtype:<9} {start_s:8.1f} {statistics.median(first):10.2f} "
              f"{statistics.median(again):9.2f} {statistics.mean(first):8.2f} "
              f"{statistics.mean(again):10.2f} "
              f"{statistics.mean(first) / statistics.mean(again):8.2f}x")


if __name__ == "__main__":
    main()
