"""Triton kernels for the GPU path, importable as `poolsvc_kernels` (see README.md).

Without Triton the package still imports: `AVAILABLE` is False, the PyTorch references work and
the wrappers raise RuntimeError. Kernels are compiled for CUDA tensors; with TRITON_INTERPRET=1
set when this package is imported (Triton reads it when `@triton.jit` decorates) they run in
Triton's interpreter, on CPU tensors.
"""

from __future__ import annotations

import torch

try:
    import triton
except ImportError:  # the references still work; the wrappers say why they cannot run
    triton = None

AVAILABLE = triton is not None

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreted(kernel) -> bool:
    """Whether `kernel` runs in Triton's interpreter (on CPU tensors) rather than compiled."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def check_tensor(name: str, t: torch.Tensor, *, shape: tuple[int | None, ...],
                 dtypes: tuple[torch.dtype, ...], rows_only: bool = False) -> None:
    """Raises ValueError unless `t` has `shape` (None matches any size) and one of `dtypes`, and
    is contiguous (only along its last dimension when `rows_only`: row strides are passed on)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape [{want}], got {list(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if rows_only:
        if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along its last dimension, got strides "
                             f"{t.stride()}")
    elif not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()} for shape "
                         f"{list(t.shape)}")


def check_launch(kernel, **tensors: torch.Tensor | None) -> None:
    """Raises ValueError unless every tensor is on one device the kernel can run on (CUDA, or the
    CPU under the interpreter), RuntimeError when Triton is not installed."""
    given = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in given.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in given.items())
        raise ValueError(f"tensors must be on one device, got {where}")
    if not AVAILABLE:
        raise RuntimeError("triton is not installed; use the *_reference functions instead")
    device = devices.pop()
    expected = "cpu" if interpreted(kernel) else "cuda"
    if device.type != expected:
        mode = ("Triton's interpreter (TRITON_INTERPRET=1) runs on CPU tensors"
                if expected == "cpu" else "compiled Triton kernels need CUDA tensors")
        raise ValueError(f"tensors are on {device}, but {mode}")


# The wrappers' modules use the helpers above, so they are imported after them.
from .add_norm import (  # noqa: E402
    add_layer_norm,
    add_layer_norm_reference,
    add_rms_norm,
    add_rms_norm_reference,
)
from .bias_gelu import bias_gelu, bias_gelu_reference  # noqa: E402
from .pooling import PoolMethod, pool, pool_reference  # noqa: E402
from .rotary import apply_rotary_, rotary_reference, rotary_tables  # noqa: E402

__all__ = [
    "AVAILABLE", "FLOAT_DTYPES", "PoolMethod", "add_layer_norm", "add_layer_norm_reference",
    "add_rms_norm", "add_rms_norm_reference", "apply_rotary_", "bias_gelu", "bias_gelu_reference",
    "pool", "pool_reference", "rotary_reference", "rotary_tables",
]
