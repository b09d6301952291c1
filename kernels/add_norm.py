"""Residual add + LayerNorm (BERT family) and residual add + RMSNorm (decoders), in one pass.

One program per row holds the whole row (the next power of two above the hidden size), so any
hidden size works and the statistics come from one read. The sum x + residual is rounded to the
input dtype first, as the unfused `x + residual` would be, and everything after it is computed in
float32. RMSNorm follows transformers: the normalized row is cast back to the input dtype before
the weight multiplies it; it also returns the sum, which decoders carry forward as the residual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import AVAILABLE, FLOAT_DTYPES, check_launch, check_tensor, triton

if AVAILABLE:
    import triton.language as tl

    @triton.jit
    def _add_layer_norm_kernel(x_ptr, residual_ptr, weight_ptr, bias_ptr, out_ptr, stride_x,
                               stride_residual, stride_out, hidden, eps,
                               HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
            h = (h.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        h = h.to(tl.float32)
        mean = tl.sum(h, axis=0) / hidden
        centered = tl.where(mask, h - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(centered * centered, axis=0) / hidden + eps)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = centered * rstd * w + b
        tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
                             stride_x, stride_residual, stride_out, stride_residual_out, hidden,
                             eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
            h = (h.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(residual_out_ptr + row * stride_residual_out + cols, h, mask=mask)
        h = h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / hidden + eps)
        normed = (h * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (w * normed).to(out_ptr.dtype.element_ty),
                 mask=mask)
else:
    _add_layer_norm_kernel = _add_rms_norm_kernel = None


def _check_rows(x: torch.Tensor, residual: torch.Tensor | None,
                **params: torch.Tensor | None) -> None:
    check_tensor("x", x, shape=(None, None), dtypes=FLOAT_DTYPES, rows_only=True)
    if residual is not None:
        check_tensor("residual", residual, shape=tuple(x.shape), dtypes=(x.dtype,),
                     rows_only=True)
    for name, t in params.items():
        if t is not None:
            check_tensor(name, t, shape=(x.shape[1],), dtypes=(x.dtype,))


def _check_out(name: str, out: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    check_tensor(name, out, shape=tuple(x.shape), dtypes=(x.dtype,), rows_only=True)
    return out


def _launch_config(hidden: int) -> dict:
    block = triton.next_power_of_2(hidden)
    return dict(BLOCK=block, num_warps=4 if block <= 2048 else 8 if block <= 8192 else 16)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm(x + residual) * weight + bias, [num_tokens, hidden] in x's dtype.

    x, residual: [num_tokens, hidden] float32/float16/bfloat16 (residual None: LayerNorm(x));
    weight, bias: [hidden] in x's dtype. Rows may be strided; `out` may be given (or be x).
    """
    _check_rows(x, residual, weight=weight, bias=bias)
    out = _check_out("out", out, x)
    check_launch(_add_layer_norm_kernel, x=x, residual=residual, weight=weight, bias=bias,
                 out=out)
    if x.shape[0] == 0:
        return out
    stride_residual = residual.stride(0) if residual is not None else 0
    _add_layer_norm_kernel[(x.shape[0],)](
        x, x if residual is None else residual, weight, bias, out, x.stride(0), stride_residual,
        out.stride(0), x.shape[1], eps, HAS_RESIDUAL=residual is not None,
        **_launch_config(x.shape[1]))
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, out: torch.Tensor | None = None,
                 residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(h) * weight, h) with h = x + residual, both [num_tokens, hidden] in x's dtype.

    x, residual: [num_tokens, hidden] float32/float16/bfloat16 (residual None: h is x itself,
    returned as is); weight: [hidden] in x's dtype. Rows may be strided; `out` and
    `residual_out` may be given (`residual_out` may be x or residual, updating it in place).
    """
    _check_rows(x, residual, weight=weight)
    out = _check_out("out", out, x)
    if residual is None:
        if residual_out is not None:
            raise ValueError("residual_out is only written when there is a residual to add")
        residual_out = x
    else:
        residual_out = _check_out("residual_out", residual_out, x)
    check_launch(_add_rms_norm_kernel, x=x, residual=residual, weight=weight, out=out,
                 residual_out=residual_out)
    if x.shape[0] == 0:
        return out, residual_out
    stride_residual = residual.stride(0) if residual is not None else 0
    _add_rms_norm_kernel[(x.shape[0],)](
        x, x if residual is None else residual, weight, out, residual_out, x.stride(0),
        stride_residual, out.stride(0), residual_out.stride(0), x.shape[1], eps,
        HAS_RESIDUAL=residual is not None, **_launch_config(x.shape[1]))
    return out, residual_out


def add_layer_norm_reference(x: torch.Tensor, residual: torch.Tensor | None,
                             weight: torch.Tensor, bias: torch.Tensor,
                             eps: float) -> torch.Tensor:
    h = x if residual is None else x + residual  # [num_tokens, hidden], rounded to x's dtype
    return F.layer_norm(h.float(), (h.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x if residual is None else x + residual  # [num_tokens, hidden]
    normed = h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), h
