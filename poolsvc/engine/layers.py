"""Building blocks shared by the model files: activations and packed variable-length attention."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from poolsvc.engine.packing import AttentionBlock, AttentionBucket, PackedBatch

if TYPE_CHECKING:
    from poolsvc.engine import native


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


# hidden_act -> the form of a GELU fused after a matrix product (the bias + GELU kernel, oneDNN's
# post-op): "none" (erf) or "tanh"; None for activations without one
FUSED_GELU = {"gelu": "none", "gelu_python": "none", "gelu_new": "tanh",
              "gelu_pytorch_tanh": "tanh"}


def activation(name: str, option: str = "hidden_act"):
    """The function config.json's `option` names."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"{option} {name!r} is not supported; known: {sorted(ACTIVATIONS)}") from None


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


# A bias of attention scores: given one group of sequences' padded q and k
# ([num_seqs, heads, width, head_dim]), what to add to their scores: [heads, width, width] when
# it depends on positions alone (MPNet), [num_seqs, heads, width, width] when on content too
# (DeBERTa's disentangled attention).
ScoreBias = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch,
                     causal: bool = False, window: int | None = None,
                     bias: ScoreBias | None = None,
                     scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention within each packed sequence: bidirectional, or causal for decoders.

    q: [num_tokens, heads, head_dim]; k, v: [num_tokens, kv_heads, head_dim] with kv_heads
    dividing heads (grouped-query attention); returns [num_tokens, heads, head_dim]. `window`:
    a token sees only those at most `window` positions away (ModernBERT's local layers; with
    `causal`, the `window` tokens before it, as Gemma2/3's sliding layers). `bias`: added to
    the scores (ScoreBias: MPNet's relative positions, DeBERTa's disentangled terms). `scale`:
    of the scores, default 1/sqrt(head_dim). `softcap`: scores become
    softcap * tanh(scores / softcap) before the mask (Gemma2), computed with explicit products
    as transformers' eager attention does. On CUDA this is flash varlen attention unless a
    window, a bias or a softcap is given. CPU SDPA has no varlen form: there, short sequences
    side by side are attended as one masked block (the batch's blocks), and the rest padded
    with sequences of similar length (its buckets), so padding costs at most BUCKET_SLACK.
    """
    num_tokens, heads, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    gqa = k.shape[1] != heads
    window = _needed(window, batch)
    if q.is_cuda and window is None and bias is None and softcap is None \
            and (found := _cuda_varlen()) is not None:
        varlen, causal_kw = found
        cu_k, max_k = batch.cu_seqlens, batch.max_seqlen
        if batch.key_rows is not None:  # some tokens are not attended to: pack the keys alone
            rows, cu_k, max_k = batch.key_rows
            k, v = k[rows], v[rows]
        return varlen(q, k, v, batch.cu_seqlens, cu_k, batch.max_seqlen, max_k, scale=scale,
                      enable_gqa=gqa, **(causal_kw if causal else {}))
    return _padded_attention((q, k, v), batch, causal, scale, gqa, window, bias, softcap)


def qkv_attention(qkv: torch.Tensor, batch: PackedBatch, window: int | None = None,
                  bias: ScoreBias | None = None,
                  kernel: native.Attention | None = None) -> torch.Tensor:
    """Bidirectional attention of one projection's query, key and value side by side,
    qkv [num_tokens, 3, heads, head_dim]; returns [num_tokens, heads, head_dim]. On the CPU each
    bucket's rows are gathered and padded once for the three. `window`, `bias`: as
    varlen_attention's. `kernel`: attention.cpp's (engine/native.py, set by the CPU path), which
    takes plain attention (no window that matters, no bias) in a dtype and head size it fits."""
    if qkv.is_cuda:
        return varlen_attention(*qkv.unbind(1), batch, window=window, bias=bias)
    window = _needed(window, batch)
    if kernel is not None and window is None and bias is None and kernel.takes(qkv):
        return kernel(qkv, batch)
    return _padded_attention(qkv, batch, False, 1.0 / math.sqrt(qkv.shape[-1]), False, window,
                             bias)


def _needed(window: int | None, batch: PackedBatch) -> int | None:
    """The window, or None when no sequence of the batch is long enough for it to matter."""
    return window if window is not None and batch.max_seqlen - 1 > window else None


def _padded_attention(x, batch: PackedBatch, causal: bool, scale: float, gqa: bool,
                      window: int | None = None,
                      bias: ScoreBias | None = None,
                      softcap: float | None = None) -> torch.Tensor:
    """x: (q, k, v), or qkv [num_tokens, 3, heads, head_dim]. Runs on any device. Plain
    bidirectional attention takes the batch's blocks (short sequences side by side, masked),
    anything else its buckets (padded)."""
    plain = not (causal or gqa) and window is None and bias is None and softcap is None
    groups = batch.blocks if plain else batch.buckets

    def attend(group: AttentionBlock | AttentionBucket) -> torch.Tensor:
        if isinstance(group, AttentionBlock):
            return _block_attention(x, group, scale)
        return _bucket_attention(x, group, causal, scale, gqa, window, bias, softcap)

    if len(groups) == 1 and groups[0].start == 0:  # every row, in order: nothing to scatter
        return attend(groups[0])
    q = x[0] if isinstance(x, tuple) else x[:, 0]
    out = q.new_empty(q.shape)
    for group in groups:
        if isinstance(group, AttentionBlock):
            out[group.start:group.stop] = attend(group)
        else:
            out.index_copy_(0, group.rows, attend(group))
    return out


# CPU flash attention (SDPA) is slow on short float32 sequences: a bucket of 50 sequences of 25
# tokens took 2.6 ms against 1.6 ms for two matrix products and a softmax (width 50: 1.9 against
# 1.4 ms); from 100 tokens on, flash wins (2.7 against 3.6 ms).
SHORT_WIDTH = 64


def _short_attention(q, k, v, mask, scale: float, softcap: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for [num_seqs, heads, width, head_dim] inputs; mask is
    boolean (True: attend) or added to the scores. `softcap`: the scores are capped first."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # [num_seqs, heads, width, width]
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    if mask is not None and mask.dtype is torch.bool:
        scores.masked_fill_(~mask, float("-inf"))
    elif mask is not None:
        scores.add_(mask)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _block_attention(x, block: AttentionBlock, scale: float) -> torch.Tensor:
    """Attention over one block's rows as one sequence, its bias keeping each sequence to
    itself; returns the block's rows [rows, heads, head_dim]."""
    rows = slice(block.start, block.stop)
    dtype = (x[0] if isinstance(x, tuple) else x).dtype
    # Two products and a softmax, in float32 (blocks are at most BLOCK_TOKENS = 64 wide, where
    # they beat flash SDPA: see SHORT_WIDTH), unless the block is one bfloat16 sequence. For a
    # bfloat16 block of several sequences they run at 1.2-1.4x masked flash SDPA's speed, and
    # do not round the scores; for one, flash is faster (11 tokens: 33 against 40 us).
    products = block.bias is not None or dtype is torch.float32
    if isinstance(x, tuple):
        q, k, v = (t[rows].transpose(0, 1) for t in x)  # [heads, rows, head_dim]
        if products:
            q, k, v = q.float(), k.float(), v.float()
    else:  # one copy to float32 for the three
        part = x[rows].float() if products else x[rows]
        q, k, v = part.permute(1, 2, 0, 3).unbind(0)
    if not products:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], scale=scale)[0] \
            .transpose(0, 1)
    if block.bias is None:
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)  # [heads, rows, rows]
    else:  # the bias added and the scale applied inside the product
        scores = torch.baddbmm(block.bias, q, k.transpose(1, 2), alpha=scale)
    out = torch.bmm(torch.softmax(scores, dim=-1), v).to(dtype)
    return out.transpose(0, 1)


@functools.lru_cache(maxsize=64)
def _tril(width: int, device: torch.device) -> torch.Tensor:
    """[width, width] bool: True where j <= i (causal); built once per shape, not per layer."""
    return torch.ones(width, width, dtype=torch.bool, device=device).tril()


@functools.lru_cache(maxsize=64)
def _band(width: int, window: int, device: torch.device) -> torch.Tensor:
    """[width, width] bool: True where |i - j| <= window; built once per shape, not per layer."""
    distance = torch.arange(width, device=device)
    return (distance[:, None] - distance[None, :]).abs() <= window


def _bucket_attention(x, bucket: AttentionBucket, causal: bool, scale: float, gqa: bool,
                      window: int | None = None,
                      bias: ScoreBias | None = None,
                      softcap: float | None = None) -> torch.Tensor:
    """SDPA over one bucket's sequences padded to [num_seqs, heads, max_seqlen, head_dim];
    returns their rows in bucket order."""
    num_seqs, width = bucket.num_seqs, bucket.max_seqlen

    def pad(t):  # [num_tokens, ...] -> [num_seqs, width, ...]
        if bucket.start is not None:  # a slice, no copy
            rows = t[bucket.start:bucket.start + bucket.rows.numel()]
        else:
            rows = t.index_select(0, bucket.rows)
        if bucket.key_mask is not None:  # zero rows after each shorter sequence
            padded = t.new_zeros(num_seqs * width, *t.shape[1:])
            padded[bucket.pad_index] = rows
            rows = padded
        return rows.view(num_seqs, width, *t.shape[1:])

    if isinstance(x, tuple):
        q, k, v = (pad(t).transpose(1, 2) for t in x)  # [num_seqs, heads, width, head_dim]
    else:
        q, k, v = pad(x).permute(2, 0, 3, 1, 4).unbind(0)
    heads, head_dim = q.shape[1], q.shape[3]
    mask = bucket.key_mask
    window = window if window is not None and width - 1 > window else None
    if causal and (mask is not None or window is not None or bias is not None
                   or softcap is not None):
        tril = _tril(width, q.device)
        mask = tril if mask is None else mask & tril
    if window is not None:
        band = _band(width, window, q.device)
        mask = band if mask is None else mask & band
    if bias is not None:  # scores + bias where attended, -inf elsewhere
        scores_bias = bias(q, k).to(q.dtype)  # [num_seqs or 1, heads, width, width]
        mask = scores_bias if mask is None else torch.where(
            mask, scores_bias, float("-inf"))  # [num_seqs or 1, heads, width, width]
    if softcap is not None:  # SDPA cannot cap scores: explicit products, any width
        if gqa:
            k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
        out = _short_attention(q, k, v, mask, scale, softcap)
    elif width <= SHORT_WIDTH and q.dtype is torch.float32 and not causal and not gqa:
        out = _short_attention(q, k, v, mask, scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                             is_causal=causal and mask is None, enable_gqa=gqa)
    out = out.transpose(1, 2).reshape(num_seqs * width, heads, head_dim)
    return out if bucket.key_mask is None else out[bucket.pad_index]
