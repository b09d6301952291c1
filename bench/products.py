"""The CPU path's matrix products alone: linear.cpp against oneDNN, in one run.

    python bench/products.py                 # MiniLM's shapes (384 wide, 6 layers)
    python bench/products.py --hidden 768 --layers 12 --rows 1,11,128

Runs the 4 products of each of `--layers` encoder layers (query/key/value; output + residual;
intermediate + GELU; output + residual), each layer with its own random weights, as a forward
pass meets them (every weight read once per pass, so a model larger than the cache reads from
memory). Prints the p50 of one pass per row count, dtype and kernel, from interleaved blocks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from poolsvc.engine import cpu, native  # noqa: E402


def layers(hidden: int, count: int, dtype: torch.dtype, linear) -> list[tuple]:
    torch.manual_seed(0)
    shapes = [(hidden, 3 * hidden, None, None), (hidden, hidden, None, "add"),
              (hidden, 4 * hidden, "none", None), (4 * hidden, hidden, None, "add")]
    out = []
    for _ in range(count):
        for k, n, gelu, binary in shapes:
            lin = torch.nn.Linear(k, n).to(dtype)
            out.append((cpu.PackedLinear.of(lin, gelu=gelu, binary=binary, linear=linear), k, n))
    return out


def one_pass(products, rows: int, dtype: torch.dtype):
    inputs = {}
    for _, k, n in products:
        inputs.setdefault(k, torch.randn(rows, k).to(dtype))
        inputs.setdefault(n, torch.randn(rows, n).to(dtype))

    def run():
        for layer, k, n in products:
            if layer.binary is None:
                layer(inputs[k])
            else:
                layer(inputs[k], inputs[n])
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--rows", default="1,11,64,256,1024")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = native.load()
    if kernels is None:
        sys.exit("the native kernels cannot be built here (no C++ compiler)")
    print(f"{'dtype':9s} {'rows':>5s} {'oneDNN ms':>10s} {'linear.cpp ms':>14s} {'ratio':>6s}")
    for dtype in (torch.float32, torch.bfloat16):
        if not (cpu.supports(dtype) and kernels.linear.fits(dtype)):
            print(f"{str(dtype)[6:]:9s} not on this CPU")
            continue
        systems = {name: layers(args.hidden, args.layers, dtype, linear)
                   for name, linear in (("onednn", None), ("native", kernels.linear))}
        for rows in map(int, args.rows.split(",")):
            runs = {name: one_pass(p, rows, dtype) for name, p in systems.items()}
            times: dict[str, list[float]] = {name: [] for name in runs}
            repeat = max(3, 3000 // max(rows, 1) // args.layers)
            with torch.inference_mode():
                for run in runs.values():
                    for _ in range(3):
                        run()
                for _ in range(args.blocks):
                    for name, run in runs.items():
                        for _ in range(repeat):
                            start = time.perf_counter()
                            run()
                            times[name].append(time.perf_counter() - start)
            a, b = (statistics.median(times[n]) * 1e3 for n in ("onednn", "native"))
            print(f"{str(dtype)[6:]:9s} {rows:5d} {a:10.3f} {b:14.3f} {a / b:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
