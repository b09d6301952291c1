"""The Triton kernels of kernels/ (package `poolsvc_kernels`) as a transform of a built model.

Layers that have a fused form carry `fused = False`; `enable` sets it, and their forward then
calls the kernel instead of the PyTorch ops. The engine enables it on CUDA unless
--disable-kernels, so a numerical difference can be bisected by turning it off.
"""

from __future__ import annotations

import functools

import torch

from poolsvc.engine.lora import LoraLinear


@functools.cache
def kernels():
    """The kernels package, imported on first use: importing triton decides once whether
    kernels compile or run interpreted (TRITON_INTERPRET), so it must not happen at import."""
    import poolsvc_kernels
    return poolsvc_kernels


def available() -> bool:
    try:
        return kernels().AVAILABLE
    except ImportError:
        return False


def enable(module: torch.nn.Module) -> int:
    """Switches every layer of `module` that has a fused form to it; returns how many. Layers
    whose own linear layers carry LoRA adapters keep their PyTorch form: a fused form may read
    a linear layer's weight directly (BERT's bias + GELU), which would leave the adapters out."""
    count = 0
    for sub in module.modules():
        if hasattr(sub, "fused") and not any(isinstance(c, LoraLinear) for c in sub.children()):
            sub.fused = True
            count += 1
    return count
