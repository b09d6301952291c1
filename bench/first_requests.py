"""A fresh server's first requests: how much more the first text of each length costs than the
same text again, and how long the server takes to start.

    python bench/first_requests.py                        # this checkout, float32 and bfloat16
    python bench/first_requests.py --baseline ../other    # and another checkout, same run

oneDNN builds a kernel for each number of rows a product sees, for the thread count it runs
with; poolsvc builds those of short batches (up to cpu.EXACT_ROWS tokens) while it starts, on the
thread that computes. Per dtype and checkout, this starts a server (the bundled model, one
process, `--threads`), sends one text of each length from 2 to 64 tokens in a shuffled order,
then the same texts again, one at a time from this process; prints the start time and the p50
and mean latency of each pass. The second pass is the baseline of the first: a server with its
kernels built answers both alike.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent


def start(root: Path, dtype: str, threads: int, log: Path) -> tuple[subprocess.Popen, str, float]:
    """A server of `root`'s poolsvc; returns it, its address and its seconds to serve."""
    started = time.perf_counter()
    handle = open(log, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "poolsvc", "serve", "--port", "0", "--dtype", dtype,
         "--threads", str(threads)], stdout=handle, stderr=subprocess.STDOUT, cwd=root)
    while time.perf_counter() - started < 600:
        if (match := re.search(r"poolsvc serving .* on [\d.]+:(\d+)", log.read_text())):
            return proc, f"127.0.0.1:{match.group(1)}", time.perf_counter() - started
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        time.sleep(0.05)
    raise SystemExit("the server did not come up")


def passes(address: str, texts: list[str]) -> tuple[list[float], list[float]]:
    """Latencies of each text once (first seen), then of each again."""
    from poolsvc.gen.v1 import common_pb2, embed_pb2, embed_pb2_grpc

    stub = embed_pb2_grpc.EmbedServiceStub(grpc.insecure_channel(address))
    out = []
    for _ in range(2):
        times = []
        for text in texts:
            request = embed_pb2.EmbedRequest(inputs=[common_pb2.Input(text=text)])
            begun = time.perf_counter()
            stub.Embed(request, timeout=60)
            times.append(time.perf_counter() - begun)
        out.append(times)
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout, measured the same way")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=2,
                        help="fresh servers per checkout and dtype, interleaved")
    args = parser.parse_args()
    roots = {"this checkout": ROOT}
    if args.baseline is not None:
        roots["baseline"] = args.baseline.resolve()
    # one text per length: [CLS] + n words + [SEP] is n + 2 tokens ("word" is one token)
    texts = [" ".join(["word"] * n) for n in range(63)]
    results: dict[tuple[str, str], list] = {}
    with tempfile.TemporaryDirectory() as work:
        for round_ in range(args.rounds):
            for dtype in args.dtypes.split(","):
                for name, root in roots.items():
                    order = texts[:]
                    random.Random(round_).shuffle(order)
                    proc, address, seconds = start(root, dtype, args.threads,
                                                   Path(work) / "server.log")
                    try:
                        first, again = passes(address, order)
                    finally:
                        proc.send_signal(signal.SIGTERM)
                        proc.wait(60)
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
