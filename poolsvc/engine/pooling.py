"""Pooling: method (reduce tokens to one row per sequence) -> head -> activation.

Methods work on packed hidden states [num_tokens, hidden] with cu_seqlens, and accumulate in
float32 whatever the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from poolsvc.engine.params import PoolingType


def _seq_index(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device),
                                   lengths, output_size=num_tokens)  # [num_tokens]


def pool_cls(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    return hidden[cu_seqlens[:-1].long()].float()


def pool_last(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    return hidden[cu_seqlens[1:].long() - 1].float()


def pool_mean(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    num_seqs = cu_seqlens.numel() - 1
    sums = hidden.new_zeros(num_seqs, hidden.shape[1], dtype=torch.float32)
    sums.index_add_(0, _seq_index(cu_seqlens, hidden.shape[0]), hidden.float())
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.float32)
    return sums / lengths[:, None]  # [num_seqs, hidden]


def pool_max(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    num_seqs = cu_seqlens.numel() - 1
    out = hidden.new_full((num_seqs, hidden.shape[1]), float("-inf"), dtype=torch.float32)
    index = _seq_index(cu_seqlens, hidden.shape[0])[:, None].expand(-1, hidden.shape[1])
    return out.scatter_reduce_(0, index, hidden.float(), reduce="amax")


SEQUENCE_POOLERS = {
    PoolingType.CLS: pool_cls,
    PoolingType.LAST: pool_last,
    PoolingType.MEAN: pool_mean,
    PoolingType.MAX: pool_max,
}


def finish_embeddings(pooled: torch.Tensor, dimensions: int | None,
                      normalize: bool) -> torch.Tensor:
    """Matryoshka truncation, then L2 normalization (TEI's order: the kept prefix has norm 1)."""
    if dimensions is not None:
        pooled = pooled[:, :dimensions]
    return F.normalize(pooled, p=2.0, dim=-1) if normalize else pooled
