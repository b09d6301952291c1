"""poolsvc's own CPU kernel, attention.cpp: built on first use with the machine's C++ compiler,
cached, and called through ctypes.

`load()` returns the kernel, or None where it cannot be built (no compiler, a failed build): the
CPU path then keeps PyTorch's attention, and says so once in the log. The build is keyed by the
source, the compiler, its flags and the CPU's features (it is compiled for this CPU), and kept in
POOLSVC_CACHE_DIR (default: $XDG_CACHE_HOME/poolsvc, else ~/.cache/poolsvc), so a restart loads
it in milliseconds. CXX names the compiler (default: c++, then g++).
"""

from __future__ import annotations

import ctypes
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

SOURCE = Path(__file__).with_name("attention.cpp")
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


@functools.cache
def load() -> Attention | None:
    """The kernel, built (or found built) for this machine; None where it cannot be."""
    return build(os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++"),
                 cache_dir())


def cache_dir() -> Path:
    if env := os.environ.get("POOLSVC_CACHE_DIR"):
        return Path(env)
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "poolsvc"


def build(compiler: str | None, directory: Path) -> Attention | None:
    """Compiles attention.cpp with `compiler` into `directory` unless a build with the same key
    is there, and loads it; None (logged) when there is no compiler or the build fails."""
    if not compiler:
        log.warning("no C++ compiler (CXX, c++ or g++): the CPU path keeps PyTorch's attention")
        return None
    key = _key(compiler)
    path = directory / f"attention-{key}.so"
    if not path.exists():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # built under a temporary name and renamed: processes building at once never load
            # a half-written library
            with tempfile.TemporaryDirectory(dir=directory) as tmp:
                out = Path(tmp) / path.name
                done = subprocess.run([compiler, *FLAGS, "-o", str(out), str(SOURCE)],
                                      capture_output=True, text=True, timeout=300)
                if done.returncode:
                    raise OSError(done.stderr.strip()[-2000:] or f"exit {done.returncode}")
                os.replace(out, path)
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("building attention.cpp with %s into %s failed (%s): the CPU path keeps "
                        "PyTorch's attention (POOLSVC_CACHE_DIR sets where the build goes)",
                        compiler, directory, e)
            return None
    # torch is imported first, so the library's libgomp is the one torch loaded: one OpenMP
    # team for both
    return Attention(ctypes.CDLL(str(path)))


def _key(compiler: str) -> str:
    """What the built library depends on: the source, the compiler and flags, this CPU."""
    digest = hashlib.sha256(SOURCE.read_bytes())
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
