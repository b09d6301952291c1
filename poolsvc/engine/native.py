"""poolsvc's own CPU kernels, attention.cpp and linear.cpp: built on first use with the
machine's C++ compiler into one library, cached, and called through ctypes (which releases the
GIL).

`load()` returns them (`Kernels`), or None where they cannot be built (no compiler, a failed
build): the CPU path then keeps PyTorch's attention and oneDNN's products, and says so once in
the log. Where the CPU lacks AVX-512 (float32) or AVX512-BF16, or has AMX (bfloat16: oneDNN's
AMX kernels are faster there), `Linear.fits` says no and oneDNN runs the products. The build is
keyed by the sources, the compiler, its flags and the CPU's features (it is compiled for this
CPU), and kept in POOLSVC_CACHE_DIR (default: $XDG_CACHE_HOME/poolsvc, else
~/.cache/poolsvc), so a restart loads it in milliseconds. CXX names the compiler (default: c++,
then g++).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from poolsvc.engine.packing import PackedBatch

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (HERE / "attention.cpp", HERE / "linear.cpp")
HEADERS = (HERE / "vector.h",)
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fopenmp", "-fPIC", "-shared")
MAX_HEAD_DIM = 128  # attention.cpp's largest head


class Attention:
    """The kernel: bidirectional attention within each sequence of a packed batch."""

    def __init__(self, library: ctypes.CDLL):
        self._fn = library.poolsvc_attention
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_int64,
                                                     ctypes.c_int64, ctypes.c_void_p,
                                                     ctypes.c_void_p, ctypes.c_int64,
                                                     ctypes.c_int64, ctypes.c_int64,
                                                     ctypes.c_float]

    @staticmethod
    def fits(head_dim: int, dtype: torch.dtype) -> bool:
        return 1 <= head_dim <= MAX_HEAD_DIM and dtype in (torch.float32, torch.bfloat16)

    def takes(self, qkv: torch.Tensor) -> bool:
        """Whether `qkv` is what the kernel reads: [num_tokens, 3, heads, head_dim], contiguous,
        on the CPU, in a dtype and head size that `fits`."""
        return qkv.dim() == 4 and qkv.shape[1] == 3 and qkv.is_contiguous() \
            and qkv.device.type == "cpu" and self.fits(qkv.shape[-1], qkv.dtype)

    def __call__(self, qkv: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """softmax(q k^T / sqrt(head_dim)) v within each sequence (keys: each sequence's first
        key_lens tokens), for a qkv the kernel `takes`; returns [num_tokens, heads, head_dim]."""
        if not self.takes(qkv):
            raise ValueError(f"the native attention takes a contiguous CPU qkv [tokens, 3, heads, "
                             f"head_dim <= {MAX_HEAD_DIM}] in float32 or bfloat16, not "
                             f"{qkv.dtype} {tuple(qkv.shape)}")
        tokens, _, heads, head_dim = qkv.shape
        out = qkv.new_empty(tokens, heads, head_dim)
        key_cu = None if batch.key_rows is None else batch.key_rows[1]  # built once a batch
        width = heads * head_dim
        base, size = qkv.data_ptr(), qkv.element_size()
        status = self._fn(base, base + width * size, base + 2 * width * size, out.data_ptr(),
                          int(qkv.dtype is torch.bfloat16), 3 * width, width,
                          batch.cu_seqlens.data_ptr(),
                          None if key_cu is None else key_cu.data_ptr(), batch.num_seqs, heads,
                          head_dim, 1.0 / math.sqrt(head_dim))
        if status:
            raise RuntimeError(f"attention.cpp refused head_dim {head_dim}")
        return out


class Linear:
    """The kernel of matrix products: `product(weight, bias, post)` packs a weight once and
    returns the layer's product, post(x W^T + bias), where `post` is nothing, a GELU ("gelu":
    erf, "gelu_tanh") or a second input of the output's shape added ("add") or multiplied
    ("mul")."""

    POSTS = {None: 0, "gelu": 1, "gelu_tanh": 2, "add": 3, "mul": 4}

    def __init__(self, library: ctypes.CDLL):
        self._fits = library.poolsvc_linear_fits
        self._fits.restype = ctypes.c_int
        self._fits.argtypes = [ctypes.c_int]
        self._size = library.poolsvc_linear_packed_size
        self._size.restype = ctypes.c_int64
        self._size.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        self._pack = library.poolsvc_linear_pack
        self._pack.restype = None
        self._pack.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                               ctypes.c_int]
        self._fn = library.poolsvc_linear
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                             ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                             ctypes.c_void_p, ctypes.c_int, ctypes.c_int]

    def fits(self, dtype: torch.dtype) -> bool:
        """Whether this build, on this CPU, runs products in `dtype`."""
        return dtype in (torch.float32, torch.bfloat16) \
            and bool(self._fits(int(dtype is torch.bfloat16)))

    def product(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                post: str | None = None) -> Product:
        """The product of `weight` ([out_features, in_features], CPU, a dtype that `fits`) and
        `bias` ([out_features] or None; added in float32), followed by `post`."""
        if weight.dim() != 2 or weight.device.type != "cpu" or not self.fits(weight.dtype):
            raise ValueError(f"linear.cpp packs a 2-D CPU weight in a dtype it fits, not "
                             f"{weight.dtype} {tuple(weight.shape)} on {weight.device}")
        if post not in self.POSTS:
            raise ValueError(f"post {post!r} is not one of {sorted(map(str, self.POSTS))}")
        n, k = weight.shape
        if bias is not None and bias.shape != (n,):
            raise ValueError(f"the bias must be [{n}], not {tuple(bias.shape)}")
        bf16 = int(weight.dtype is torch.bfloat16)
        w = weight.detach().contiguous()
        packed = w.new_empty(self._size(n, k, bf16))
        self._pack(w.data_ptr(), n, k, packed.data_ptr(), bf16)
        if bias is not None:  # the layer's own float32 copy, which the kernel reads
            bias = bias.detach().to(torch.float32, memory_format=torch.contiguous_format,
                                    copy=True)
        return Product(self._fn, packed, n, k, bias, post)


class Product:
    """One layer's product (Linear.product): [..., in_features] -> [..., out_features], called
    as product(x), or product(x, other) for "add" and "mul" (other: [..., out_features])."""

    def __init__(self, fn, packed: torch.Tensor, out_features: int, in_features: int,
                 bias: torch.Tensor | None, post: str | None):
        self.packed, self.bias, self.post = packed, bias, post  # held: the kernel reads them
        self.out_features, self.in_features, self.dtype = out_features, in_features, packed.dtype
        self.binary = post in ("add", "mul")
        # what every call passes unchanged, converted once (a call costs ~2 us of Python)
        self._fn = fn
        self._constant = (packed.data_ptr(), None if bias is None else bias.data_ptr(),
                          Linear.POSTS[post], int(packed.dtype is torch.bfloat16))

    def __call__(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        if x.dtype is not self.dtype or not x.dim() or x.shape[-1] != k or not x.is_cpu:
            raise ValueError(f"this product takes [..., {k}] {self.dtype} on the CPU, not "
                             f"{x.dtype} {tuple(x.shape)} on {x.device}")
        if (other is not None) != self.binary:
            raise ValueError(f"post {self.post!r}: pass `other` exactly for 'add' and 'mul'")
        rows = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, k).contiguous()
        m = rows.shape[0]
        out = rows.new_empty((m, n))
        if other is not None:
            if other.shape != x.shape[:-1] + (n,) or other.dtype is not self.dtype:
                raise ValueError(f"`other` must be {self.dtype} {tuple(x.shape[:-1]) + (n,)}, "
                                 f"not {other.dtype} {tuple(other.shape)}")
            if not other.is_contiguous():
                other = other.contiguous()
        weight, bias, post, bf16 = self._constant
        if m and self._fn(rows.data_ptr(), m, k, weight, n, bias, post,
                          None if other is None else other.data_ptr(), out.data_ptr(), bf16,
                          torch.get_num_threads()):
            raise RuntimeError(f"linear.cpp refused {self.dtype} with post {post!r}")
        return out if x.dim() == 2 else out.view(*x.shape[:-1], n)


@dataclasses.dataclass(frozen=True)
class Kernels:
    """What the library holds. `linear` None: products stay on oneDNN (tests use that)."""
    attention: Attention
    linear: Linear | None


@functools.cache
def load() -> Kernels | None:
    """The kernels, built (or found built) for this machine; None where they cannot be."""
    return build(os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++"),
                 cache_dir())


def cache_dir() -> Path:
    if env := os.environ.get("POOLSVC_CACHE_DIR"):
        return Path(env)
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "poolsvc"


def build(compiler: str | None, directory: Path) -> Kernels | None:
    """Compiles the kernels with `compiler` into `directory` unless a build with the same key
    is there, and loads them; None (logged) when there is no compiler or the build fails."""
    if not compiler:
        log.warning("no C++ compiler (CXX, c++ or g++): the CPU path keeps PyTorch's attention "
                    "and oneDNN's products")
        return None
    key = _key(compiler)
    path = directory / f"kernels-{key}.so"
    if not path.exists():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # built under a temporary name and renamed: processes building at once never load
            # a half-written library
            with tempfile.TemporaryDirectory(dir=directory) as tmp:
                out = Path(tmp) / path.name
                objects = [Path(tmp) / f"{source.stem}.o" for source in SOURCES]
                # the sources compile side by side (9 s in a row here, 5.5 s so), then link
                _run_all([[compiler, *FLAGS, "-c", "-o", str(o), str(source)]
                          for source, o in zip(SOURCES, objects)])
                _run_all([[compiler, *FLAGS, "-o", str(out), *map(str, objects)]])
                os.replace(out, path)
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("building the kernels (%s) with %s into %s failed (%s): the CPU path "
                        "keeps PyTorch's attention and oneDNN's products (POOLSVC_CACHE_DIR sets "
                        "where the build goes)", ", ".join(p.name for p in SOURCES), compiler,
                        directory, e)
            return None
    # torch is imported first, so the library's libgomp is the one torch loaded: one OpenMP
    # team for both
    library = ctypes.CDLL(str(path))
    return Kernels(Attention(library), Linear(library))


def _run_all(commands: list[list[str]], timeout: float = 300) -> None:
    """Runs `commands` at once; OSError with the first failure's stderr if any fails."""
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c in commands]
    try:
        errors = [(p.communicate(timeout=timeout)[1], p.returncode) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for stderr, code in errors:
        if code:
            raise OSError(stderr.strip()[-2000:] or f"exit {code}")


def _key(compiler: str) -> str:
    """What the built library depends on: the sources, the compiler and flags, this CPU."""
    digest = hashlib.sha256()
    for source in SOURCES + HEADERS:
        digest.update(source.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = compiler
    digest.update(version.encode())
    digest.update(_cpu_features().encode())
    return digest.hexdigest()[:16]


def _cpu_features() -> str:
    """The CPU's model and feature flags (Linux), which -march=native compiles for."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform
        return platform.processor() + platform.machine()
    lines = [line for line in info.splitlines()
             if line.startswith(("flags", "model name", "Features", "CPU part"))]
    return "\n".join(sorted(set(lines)))
