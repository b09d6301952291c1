"""Building blocks shared by the model files: activations and packed variable-length attention."""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F

from poolsvc.engine.packing import PackedBatch


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# Hugging Face `hidden_act` names, with the same formulas as transformers' ACT2FN.
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_python": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_fast,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"hidden_act {name!r} is not supported; known: {sorted(ACTIVATIONS)}") from None


@functools.cache
def _cuda_varlen():
    """torch's flash varlen attention and how this torch spells causal masking, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    return varlen_attn, causal


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch,
                     causal: bool = False) -> torch.Tensor:
    """Attention within each packed sequence: bidirectional, or causal for decoders.

    q: [num_tokens, heads, head_dim]; k, v: [num_tokens, kv_heads, head_dim] with kv_heads
    dividing heads (grouped-query attention); returns [num_tokens, heads, head_dim]. On CUDA this
    is flash varlen attention; elsewhere the sequences are scattered into a padded
    [num_seqs, heads, max_seqlen, head_dim] block for SDPA with a padding mask, since CPU SDPA has
    no varlen form.
    """
    num_tokens, heads, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim)
    gqa = k.shape[1] != heads
    if q.is_cuda and (found := _cuda_varlen()) is not None:
        varlen, causal_kw = found
        return varlen(q, k, v, batch.cu_seqlens, batch.cu_seqlens, batch.max_seqlen,
                      batch.max_seqlen, scale=scale, enable_gqa=gqa,
                      **(causal_kw if causal else {}))
    num_seqs, max_seqlen = batch.num_seqs, batch.max_seqlen
    if num_seqs == 1:  # nothing to pad
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=scale,
            is_causal=causal, enable_gqa=gqa)
        return out.transpose(0, 1)

    def pad(x):  # [num_tokens, h, d] -> [num_seqs, h, max_seqlen, d]
        out = x.new_zeros(num_seqs * max_seqlen, x.shape[1], head_dim)
        out[batch.pad_index] = x
        return out.view(num_seqs, max_seqlen, x.shape[1], head_dim).transpose(1, 2)

    mask = batch.key_mask  # [num_seqs, 1, 1, max_seqlen]
    if causal:
        mask = mask & torch.ones(max_seqlen, max_seqlen, dtype=torch.bool,
                                 device=q.device).tril()
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, scale=scale,
                                         enable_gqa=gqa)
    return out.transpose(1, 2).reshape(num_seqs * max_seqlen, heads, head_dim)[batch.pad_index]
