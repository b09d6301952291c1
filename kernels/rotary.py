"""Rotary position embedding on packed q and k, in place, in transformers' rotate_half form.

With x1, x2 the two halves of a head and c, s the cos / sin of the token's position:
out = (x1 * c - x2 * s, x2 * c + x1 * s), which is x * cos + rotate_half(x) * sin with cos and
sin repeated over both halves (Llama, Mistral, Qwen). One program per token rotates all of its q
and k heads, in float32 with float32 tables, rounding once to q's dtype. (transformers casts cos
and sin to the model dtype and rounds after each operation, so in bfloat16 the two can differ by
an ulp; this is the more exact of the two.)
"""

from __future__ import annotations

import torch

from . import AVAILABLE, FLOAT_DTYPES, check_launch, check_tensor, triton

if AVAILABLE:
    import triton.language as tl

    @triton.jit
    def _rotate_heads(x_ptr, stride_head, num_heads, cos, sin, dims, dim_mask, half,
                      BLOCK_H: tl.constexpr):
        heads = tl.arange(0, BLOCK_H)
        mask = (heads < num_heads)[:, None] & dim_mask[None, :]  # [BLOCK_H, BLOCK_HALF]
        first = x_ptr + heads[:, None] * stride_head + dims[None, :]
        x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
        tl.store(first, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(first + half, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, positions_ptr, cos_ptr, sin_ptr, stride_q_token,
                       stride_q_head, stride_k_token, stride_k_head, num_heads, num_kv_heads,
                       half, BLOCK_Q_HEADS: tl.constexpr, BLOCK_K_HEADS: tl.constexpr,
                       BLOCK_HALF: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        position = tl.load(positions_ptr + token)
        dims = tl.arange(0, BLOCK_HALF)
        dim_mask = dims < half
        cos = tl.load(cos_ptr + position * half + dims, mask=dim_mask, other=0.0)[None, :]
        sin = tl.load(sin_ptr + position * half + dims, mask=dim_mask, other=0.0)[None, :]
        _rotate_heads(q_ptr + token * stride_q_token, stride_q_head, num_heads, cos, sin, dims,
                      dim_mask, half, BLOCK_Q_HEADS)
        _rotate_heads(k_ptr + token * stride_k_token, stride_k_head, num_kv_heads, cos, sin,
                      dims, dim_mask, half, BLOCK_K_HEADS)
else:
    _rotary_kernel = None


def _check_args(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> None:
    check_tensor("q", q, shape=(None, None, None), dtypes=FLOAT_DTYPES, rows_only=True)
    num_tokens, _, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    check_tensor("k", k, shape=(num_tokens, None, head_dim), dtypes=(q.dtype,), rows_only=True)
    check_tensor("positions", positions, shape=(num_tokens,), dtypes=(torch.int64,))
    check_tensor("cos", cos, shape=(None, head_dim // 2), dtypes=(torch.float32,))
    check_tensor("sin", sin, shape=tuple(cos.shape), dtypes=(torch.float32,))


def apply_rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [num_tokens, heads, head_dim] and k [num_tokens, kv_heads, head_dim] in place
    and returns them.

    q, k: float32/float16/bfloat16, one dtype, contiguous along head_dim (token and head strides
    are passed on, so views of a fused qkv projection work). positions: [num_tokens] int64.
    cos, sin: [max_position, head_dim // 2] float32 (see rotary_tables). Positions are not
    checked against max_position here (that would synchronize).
    """
    _check_args(q, k, positions, cos, sin)
    check_launch(_rotary_kernel, q=q, k=k, positions=positions, cos=cos, sin=sin)
    num_tokens, heads, head_dim = q.shape
    if num_tokens == 0:
        return q, k
    block_q, block_k = triton.next_power_of_2(heads), triton.next_power_of_2(k.shape[1])
    block_half = triton.next_power_of_2(head_dim // 2)
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), heads,
        k.shape[1], head_dim // 2, BLOCK_Q_HEADS=block_q, BLOCK_K_HEADS=block_k,
        BLOCK_HALF=block_half, num_warps=4 if block_q * block_half <= 2048 else 8)
    return q, k


def rotary_tables(inv_freq: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_positions, head_dim // 2] float32 from inv_freq [head_dim // 2], with the
    same float32 products as the engine's RotaryEmbedding."""
    positions = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = positions[:, None] * inv_freq.float()[None, :]  # [max_positions, head_dim // 2]
    return freqs.cos(), freqs.sin()


def rotary_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rotary_` in plain PyTorch, returning new tensors."""
    c, s = cos[positions], sin[positions]  # [num_tokens, head_dim // 2]
    c = torch.cat((c, c), dim=-1)[:, None, :]  # [num_tokens, 1, head_dim]
    s = torch.cat((s, s), dim=-1)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x1, x2 = x.chunk(2, dim=-1)
        return x * c + torch.cat((-x2, x1), dim=-1) * s

    return rotate(q).to(q.dtype), rotate(k).to(k.dtype)
