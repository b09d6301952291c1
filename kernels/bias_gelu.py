"""gelu(x + bias): the bias of the Linear before a GELU, fused into the activation.

The sum is rounded to x's dtype, as the Linear's output would be, then the GELU runs in float32:
the exact erf form, or the tanh approximation (torch's approximate="tanh"), written as
x * sigmoid(2u) = x / (1 + exp(-2u)), which equals 0.5 * x * (1 + tanh(u)) and needs no tanh.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import AVAILABLE, FLOAT_DTYPES, check_launch, check_tensor, triton

APPROXIMATIONS = ("none", "tanh")  # torch.nn.functional.gelu's `approximate`

if AVAILABLE:
    import triton.language as tl

    @triton.jit
    def _bias_gelu_kernel(x_ptr, bias_ptr, out_ptr, n_cols, HAS_BIAS: tl.constexpr,
                          TANH: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
        if HAS_BIAS:
            b = tl.load(bias_ptr + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + b.to(tl.float32)).to(x_ptr.dtype.element_ty)
        x = x.to(tl.float32)
        if TANH:
            u = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi) * (...)
            y = x / (1.0 + tl.exp(-2.0 * u))
        else:
            y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))  # x / sqrt(2)
        tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
else:
    _bias_gelu_kernel = None


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none",
              out: torch.Tensor | None = None) -> torch.Tensor:
    """gelu(x + bias) with torch's `approximate` ("none": erf, "tanh"), in x's dtype.

    x: [..., n] contiguous float32/float16/bfloat16; bias: [n] in x's dtype, or None for a plain
    GELU. `out` (x's shape and dtype, contiguous) may be given, or be x itself.
    """
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    check_tensor("x", x, shape=(None,) * max(getattr(x, "ndim", 1), 1), dtypes=FLOAT_DTYPES)
    n_cols = x.shape[-1]
    if bias is not None:
        check_tensor("bias", bias, shape=(n_cols,), dtypes=(x.dtype,))
    if out is None:
        out = torch.empty_like(x)
    else:
        check_tensor("out", out, shape=tuple(x.shape), dtypes=(x.dtype,))
    check_launch(_bias_gelu_kernel, x=x, bias=bias, out=out)
    if x.numel() == 0:
        return out
    block = min(triton.next_power_of_2(n_cols), 1024)
    _bias_gelu_kernel[(x.numel() // n_cols, triton.cdiv(n_cols, block))](
        x, x if bias is None else bias, out, n_cols, HAS_BIAS=bias is not None,
        TANH=approximate == "tanh", BLOCK=block, num_warps=4)
    return out


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor | None,
                        approximate: str = "none") -> torch.Tensor:
    return F.gelu(x if bias is None else x + bias, approximate=approximate)
