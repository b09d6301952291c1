"""Pooling: method (tokens -> rows) -> head -> activation.

Methods work on packed hidden states [num_tokens, hidden] with cu_seqlens. Sequence methods give
one row per sequence and accumulate in float32; per-token methods (ALL, STEP) give a variable
number of rows per sequence. Activations run on the host in float32, per request.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.params import Activation, PoolingType


def _seq_index(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device),
                                   lengths, output_size=num_tokens)  # [num_tokens]


def _lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.float32)  # [num_seqs]


def _weighted_sum(hidden: torch.Tensor, cu_seqlens: torch.Tensor,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    num_seqs = cu_seqlens.numel() - 1
    values = hidden.float() if weights is None else hidden.float() * weights[:, None]
    sums = hidden.new_zeros(num_seqs, hidden.shape[1], dtype=torch.float32)
    return sums.index_add_(0, _seq_index(cu_seqlens, hidden.shape[0]), values)


def pool_cls(hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    return hidden[batch.cu_seqlens[:-1].long()].float()


def pool_last(hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    return hidden[batch.cu_seqlens[1:].long() - 1].float()


def pool_mean(hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    return _weighted_sum(hidden, batch.cu_seqlens) / _lengths(batch.cu_seqlens)[:, None]


def pool_mean_sqrt_len(hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    return _weighted_sum(hidden, batch.cu_seqlens) / _lengths(batch.cu_seqlens).sqrt()[:, None]


def pool_weighted_mean(hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Sentence-Transformers' weightedmean: token i of a sequence weighs i + 1."""
    # Every sequence's positions start at the same offset, so this is the 1-based position.
    weights = (batch.positions - batch.positions[0] + 1).float()  # [num_tokens]
    lengths = _lengths(batch.cu_seqlens)
    return _weighted_sum(hidden, batch.cu_seqlens, weights) / (lengths * (lengths + 1) / 2)[:, None]


def pool_max(hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    num_seqs = batch.num_seqs
    out = hidden.new_full((num_seqs, hidden.shape[1]), float("-inf"), dtype=torch.float32)
    index = _seq_index(batch.cu_seqlens, hidden.shape[0])[:, None].expand(-1, hidden.shape[1])
    return out.scatter_reduce_(0, index, hidden.float(), reduce="amax")


SEQUENCE_POOLERS = {
    PoolingType.CLS: pool_cls,
    PoolingType.LAST: pool_last,
    PoolingType.MEAN: pool_mean,
    PoolingType.MAX: pool_max,
    PoolingType.WEIGHTED_MEAN: pool_weighted_mean,
    PoolingType.MEAN_SQRT_LEN: pool_mean_sqrt_len,
}


def token_rows(pooling: PoolingType, hidden: torch.Tensor, batch: PackedBatch,
               step_tag_id: int | None) -> tuple[torch.Tensor, list[int]]:
    """ALL: every token's row. STEP: the rows at step-tag tokens (every token when no tag is
    configured). Returns the rows, [rows, hidden], and how many belong to each sequence."""
    if pooling is PoolingType.ALL or step_tag_id is None:
        return hidden, list(batch.prompt_lens)
    keep = batch.input_ids == step_tag_id  # [num_tokens]
    counts = torch.zeros(batch.num_seqs, dtype=torch.long, device=hidden.device)
    counts.index_add_(0, _seq_index(batch.cu_seqlens, hidden.shape[0]), keep.long())
    return hidden[keep], counts.tolist()


class DenseHead(nn.Module):
    """Sentence-Transformers Dense modules, chained in order after pooling."""

    def __init__(self, layers: list[tuple[nn.Linear, Activation]]):
        super().__init__()
        self.linears = nn.ModuleList(linear for linear, _ in layers)
        self.activations = [act for _, act in layers]

    @property
    def out_features(self) -> int:
        return self.linears[-1].out_features

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        for linear, act in zip(self.linears, self.activations):
            rows = activate(linear(rows.to(linear.weight.dtype)), act)
        return rows


def activate(x: torch.Tensor, activation: Activation) -> torch.Tensor:
    if activation is Activation.SIGMOID:
        return torch.sigmoid(x)
    if activation is Activation.SOFTMAX:
        return torch.softmax(x, dim=-1)
    if activation is Activation.TANH:
        return torch.tanh(x)
    return x


def finish_embeddings(pooled: torch.Tensor, dimensions: int | None,
                      normalize: bool) -> torch.Tensor:
    """Matryoshka truncation, then L2 normalization (TEI's order: the kept prefix has norm 1)."""
    if dimensions is not None:
        pooled = pooled[..., :dimensions]
    return F.normalize(pooled, p=2.0, dim=-1) if normalize else pooled
