"""The Triton kernels of kernels/ (package `poolsvc_kernels`) as a transform of a built model.

Layers that have a fused form carry `fused = False`; `enable` sets it, and their forward then
calls the kernel instead of the PyTorch ops. A fused form that reads a linear layer's weight
directly, rather than calling the layer, names it in `fused_reads` (see `enable`). The engine
enables it on CUDA unless --disable-kernels, so a numerical difference can be bisected by
turning it off.
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
    """Switches every layer of `module` that has a fused form to it; returns how many. A layer
    whose fused form reads some of its linear layers' weights directly (it names them in
    `fused_reads`, e.g. BERT's bias + GELU) keeps its PyTorch form when one of those carries
    LoRA adapters, which the fused form would leave out."""
    count = 0
    for sub in module.modules():
        if not hasattr(sub, "fused"):
            continue
        if any(isinstance(getattr(sub, name), LoraLinear)
               for name in getattr(sub, "fused_reads", ())):
            continue
        sub.fused = True
        count += 1
    return count
