"""Sequence pooling on packed hidden states, fused with Matryoshka truncation, L2 normalization
and the cast to the output dtype.

CLS takes a sequence's first row, LAST its last row, MEAN the float32 mean of its rows. An empty
sequence (cu_seqlens[i] == cu_seqlens[i + 1]) pools to zeros with every method, and stays zeros
after normalization (F.normalize's convention: x / max(norm, 1e-12)).

Two launches at most: the pooling kernel runs one program per (sequence, block of kept columns)
and, without normalization, writes the output directly; with it, it writes float32 rows (into the
output itself when that is float32) and a second kernel, one program per row, divides each row by
its norm and casts.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F

from . import AVAILABLE, FLOAT_DTYPES, check_launch, check_tensor, triton

NORM_EPS = 1e-12  # torch.nn.functional.normalize's default


class PoolMethod(enum.IntEnum):
    """The sequence methods with a kernel; named like the engine's PoolingType members, so
    `PoolMethod[pooling_type.name]` converts (and `pool` accepts either)."""

    CLS = 0
    LAST = 1
    MEAN = 2


if AVAILABLE:
    import triton.language as tl

    @triton.jit
    def _pool_kernel(hidden_ptr, cu_seqlens_ptr, seq_index_ptr, out_ptr, stride_hidden,
                     stride_out, dimensions, METHOD: tl.constexpr, HAS_INDEX: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        row_out = tl.program_id(0)
        if HAS_INDEX:  # output row i pools sequence seq_index[i]
            seq = tl.load(seq_index_ptr + row_out)
        else:
            seq = row_out
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
        col_mask = cols < dimensions
        start = tl.load(cu_seqlens_ptr + seq)
        end = tl.load(cu_seqlens_ptr + seq + 1)
        if METHOD == 2:  # MEAN: [BLOCK_T, BLOCK_D] tiles of rows, summed in float32
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for first in range(start, end, BLOCK_T):
                rows = first + tl.arange(0, BLOCK_T)  # [BLOCK_T]
                mask = (rows < end)[:, None] & col_mask[None, :]
                offsets = rows.to(tl.int64)[:, None] * stride_hidden + cols[None, :]
                x = tl.load(hidden_ptr + offsets, mask=mask, other=0.0)
                acc += tl.sum(x.to(tl.float32), axis=0)
            pooled = acc / tl.maximum(end - start, 1).to(tl.float32)  # empty: 0 / 1
        else:
            if METHOD == 0:
                row = start
            else:
                row = end - 1
            # an empty sequence loads nothing (its row may be out of bounds) and pools to zeros
            loaded = tl.where(end > start, dimensions, 0)
            x = tl.load(hidden_ptr + row.to(tl.int64) * stride_hidden + cols,
                        mask=cols < loaded, other=0.0)
            pooled = x.to(tl.float32)
        tl.store(out_ptr + row_out.to(tl.int64) * stride_out + cols,
                 pooled.to(out_ptr.dtype.element_ty), mask=col_mask)

    @triton.jit
    def _l2_normalize_kernel(rows_ptr, out_ptr, stride_rows, stride_out, dimensions, eps,
                             BLOCK_D: tl.constexpr):
        # rows and out may be the same float32 buffer: each block is read before it is written
        row = tl.program_id(0).to(tl.int64)
        sum_sq = tl.zeros([BLOCK_D], dtype=tl.float32)
        for first in range(0, dimensions, BLOCK_D):
            cols = first + tl.arange(0, BLOCK_D)
            x = tl.load(rows_ptr + row * stride_rows + cols, mask=cols < dimensions, other=0.0)
            sum_sq += x * x
        norm = tl.maximum(tl.sqrt(tl.sum(sum_sq, axis=0)), eps)
        for first in range(0, dimensions, BLOCK_D):
            cols = first + tl.arange(0, BLOCK_D)
            mask = cols < dimensions
            x = tl.load(rows_ptr + row * stride_rows + cols, mask=mask, other=0.0)
            tl.store(out_ptr + row * stride_out + cols, (x / norm).to(out_ptr.dtype.element_ty),
                     mask=mask)
else:
    _pool_kernel = _l2_normalize_kernel = None


def _pool_method(method) -> PoolMethod:
    name = getattr(method, "name", method)
    if isinstance(name, str) and name in PoolMethod.__members__:
        return PoolMethod[name]
    raise ValueError(f"pooling method {method!r} has no kernel; supported: "
                     f"{', '.join(PoolMethod.__members__)}")


def _check_args(hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, method,
                dimensions: int | None, out_dtype: torch.dtype | None,
                out: torch.Tensor | None,
                seq_index: torch.Tensor | None) -> tuple[PoolMethod, int, torch.dtype, int]:
    check_tensor("hidden_states", hidden_states, shape=(None, None), dtypes=FLOAT_DTYPES,
                 rows_only=True)
    check_tensor("cu_seqlens", cu_seqlens, shape=(None,), dtypes=(torch.int32,))
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must hold num_seqs + 1 offsets, got an empty tensor")
    num_rows = cu_seqlens.numel() - 1
    if seq_index is not None:
        check_tensor("seq_index", seq_index, shape=(None,), dtypes=(torch.int32, torch.int64))
        num_rows = seq_index.numel()
    hidden = hidden_states.shape[1]
    dimensions = hidden if dimensions is None else dimensions
    if not 1 <= dimensions <= hidden:
        raise ValueError(f"dimensions must be in [1, {hidden}] (the hidden size), got {dimensions}")
    if out is not None:
        check_tensor("out", out, shape=(num_rows, dimensions), dtypes=FLOAT_DTYPES,
                     rows_only=True)
        if out_dtype is not None and out_dtype != out.dtype:
            raise ValueError(f"out_dtype {out_dtype} does not match out's dtype {out.dtype}")
        out_dtype = out.dtype
    out_dtype = torch.float32 if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    return _pool_method(method), dimensions, out_dtype, num_rows


def pool(hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, method: PoolMethod,
         dimensions: int | None = None, normalize: bool = False,
         out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
         seq_index: torch.Tensor | None = None) -> torch.Tensor:
    """One pooled row per sequence: [num_seqs, dimensions] in `out_dtype` (default float32, or
    out's dtype), written into `out` when given. With `seq_index` ([n] int32/int64), only those
    sequences, in that order: [n, dimensions].

    hidden_states: [num_tokens, hidden] float32/float16/bfloat16, rows may be strided.
    cu_seqlens: [num_seqs + 1] int32 with sequence i in rows cu_seqlens[i]:cu_seqlens[i + 1];
    the offsets are not checked here (that would synchronize): they must be non-decreasing and
    at most num_tokens. dimensions: the kept prefix of each row (Matryoshka), None for all.
    normalize: L2-normalize the kept prefix.
    """
    method, dimensions, out_dtype, num_seqs = _check_args(hidden_states, cu_seqlens, method,
                                                          dimensions, out_dtype, out, seq_index)
    if out is None:
        out = torch.empty(num_seqs, dimensions, dtype=out_dtype, device=hidden_states.device)
    check_launch(_pool_kernel, hidden_states=hidden_states, cu_seqlens=cu_seqlens, out=out,
                 seq_index=seq_index)
    if num_seqs == 0:
        return out
    if normalize and out.dtype != torch.float32:
        rows = torch.empty(num_seqs, dimensions, dtype=torch.float32, device=out.device)
    else:
        rows = out
    block_d = min(triton.next_power_of_2(dimensions), 128)
    _pool_kernel[(num_seqs, triton.cdiv(dimensions, block_d))](
        hidden_states, cu_seqlens, cu_seqlens if seq_index is None else seq_index, rows,
        hidden_states.stride(0), rows.stride(0), dimensions, METHOD=int(method),
        HAS_INDEX=seq_index is not None, BLOCK_T=16, BLOCK_D=block_d, num_warps=4)
    if normalize:
        block_d = min(triton.next_power_of_2(dimensions), 1024)
        _l2_normalize_kernel[(num_seqs,)](rows, out, rows.stride(0), out.stride(0), dimensions,
                                          NORM_EPS, BLOCK_D=block_d, num_warps=4)
    return out


def pool_reference(hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, method: PoolMethod,
                   dimensions: int | None = None, normalize: bool = False,
                   out_dtype: torch.dtype = torch.float32,
                   seq_index: torch.Tensor | None = None) -> torch.Tensor:
    """`pool` in plain PyTorch, one sequence at a time."""
    method = _pool_method(method)
    dimensions = hidden_states.shape[1] if dimensions is None else dimensions
    bounds = cu_seqlens.tolist()
    pooled = hidden_states.new_zeros(len(bounds) - 1, hidden_states.shape[1],
                                     dtype=torch.float32)  # [num_seqs, hidden]
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end == start:
            continue  # an empty sequence pools to zeros
        rows = hidden_states[start:end].float()  # [seq_len, hidden]
        if method is PoolMethod.CLS:
            pooled[i] = rows[0]
        elif method is PoolMethod.LAST:
            pooled[i] = rows[-1]
        else:
            pooled[i] = rows.sum(0) / (end - start)
    if seq_index is not None:
        pooled = pooled[seq_index.long()]
    pooled = pooled[:, :dimensions]
    if normalize:
        pooled = F.normalize(pooled, p=2.0, dim=-1, eps=NORM_EPS)
    return pooled.to(out_dtype)
