"""The HTTP/JSON route beside gRPC, in one run on one server: texts/s and p50/p99 latency of
1-text and 32-text embedding requests, each front driven by the same separate client process
(bench/load_client.py: gRPC Embed, or POST /v1/embeddings with base64 vectors).

    python bench/http_vs_grpc.py                       # queries, 8 callers in flight
    python bench/http_vs_grpc.py --texts 2000 --concurrency 16 --repeat 3

Prints a table with gRPC as the baseline (the ratio is HTTP's throughput over gRPC's).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start_server(threads: int, log: Path) -> tuple[subprocess.Popen, str, str]:
    cmd = [sys.executable, "-m", "poolsvc", "serve", "--port", "0", "--http-port", "-1",
           "--threads", str(threads), "--auto-truncate",
           "--max-queue-seconds", "3600"]  # a loaded machine must not shed the benchmark's work
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        text = log.read_text()
        grpc_port = re.search(r"poolsvc serving .* on [\d.]+:(\d+)", text)
        http_port = re.search(r"HTTP/JSON routes on http://([\d.]+:\d+)", text)
        if grpc_port and http_port:
            return proc, f"127.0.0.1:{grpc_port.group(1)}", http_port.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{text}")
        time.sleep(0.2)
    raise SystemExit("the server did not come up")


def client(mode: str, address: str, texts: Path, batch: int, concurrency: int) -> dict:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load_client.py"), "--address", address,
         "--texts", str(texts), "--mode", mode, "--batch", str(batch),
         "--concurrency", str(concurrency)], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"load client failed:\n{done.stderr}")
    return json.loads(done.stdout)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "bench" / "data" / "queries.jsonl"))
    parser.add_argument("--texts", type=int, default=1024, help="how many texts of --data")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="rounds; each front's best counts")
    args = parser.parse_args()
    lines = Path(args.data).read_text().splitlines()[:args.texts]
    texts = [json.loads(line)["text"] for line in lines]
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "texts.json"
        path.write_text(json.dumps(texts))
        proc, grpc_address, http_address = start_server(args.threads, Path(work) / "server.log")
        fronts = {"gRPC Embed": ("unary", grpc_address),
                  "HTTP /v1/embeddings": ("http", http_address)}
        try:
            for mode, address in fronts.values():  # warm-up
                client(mode, address, path, 32, args.concurrency)
            rows = []
            for batch in (1, 32):
                for name, (mode, address) in fronts.items():
                    # Rounds alternate between the fronts (below), so both see the same machine.
                    rows.append((batch, name, mode, address, []))
            for _ in range(args.repeat):
                for batch, _name, mode, address, results in rows:
                    results.append(client(mode, address, path, batch, args.concurrency))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    print(f"\n{len(texts)} texts of {Path(args.data).name}, {args.concurrency} requests in "
          f"flight, {args.threads} threads; best of {args.repeat} rounds\n")
    print(f"{'texts/request':>13}  {'front':<20} {'texts/s':>9} {'vs gRPC':>8} {'p50 ms':>8} "
          f"{'p99 ms':>8}")
    baseline = {}
    for batch, name, _, _, results in rows:
        best = max(results, key=lambda r: r["texts"] / r["wall"])
        rate = best["texts"] / best["wall"]
        baseline.setdefault(batch, rate)
        print(f"{batch:>13}  {name:<20} {rate:9.1f} {rate / baseline[batch]:7.2f}x "
              f"{percentile(best['latencies'], 50) * 1e3:8.1f} "
              f"{percentile(best['latencies'], 99) * 1e3:8.1f}")


if __name__ == "__main__":
    main()
