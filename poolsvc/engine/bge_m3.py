"""BGE-M3 (FlagEmbedding's BGEM3FlagModel layout): an XLM-R body and, beside its dense [CLS]
vector, two heads read from plain tensor state dicts next to the weights: `sparse_linear.pt` (a
weight per token, relu(w . h + b); a text's lexical weights are each token id's largest, special
tokens dropped) and `colbert_linear.pt` (a vector per token after [CLS], normalized). Both are
loaded with torch.load(weights_only=True): tensors only, never arbitrary objects.

One forward pass gives every embedding a request asks for: `rows` packs a sequence's outputs as
one flat float32 row on the device (dense [H], then a weight per token [T], then the token vectors
[(T - 1) * D]), `unpack` splits it on the host, and `hybrid_scores` mixes the three scores as
BGEM3FlagModel.compute_score does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from poolsvc.engine.backend import Backend
from poolsvc.engine.errors import ModelLoadError
from poolsvc.engine.late_interaction import maxsim
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.params import EmbeddingType, HybridWeights

HEADS = ("colbert_linear.pt", "sparse_linear.pt")


def read_heads(path: Path) -> tuple[nn.Linear, nn.Linear] | None:
    """(colbert_linear, sparse_linear) when `path` holds both, else None."""
    if not all((path / name).is_file() for name in HEADS):
        return None
    heads = []
    for name in HEADS:
        try:
            state = torch.load(path / name, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelLoadError(f"{path / name}: not a plain tensor state dict ({exc})") from None
        if not isinstance(state, dict):
            raise ModelLoadError(f"{path / name}: not a state dict")
        weight, bias = state.get("weight"), state.get("bias")
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise ModelLoadError(f"{path / name}: no 2-D 'weight' tensor")
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        linear.load_state_dict(state)
        heads.append(linear)
    if heads[1].out_features != 1:
        raise ModelLoadError(f"{path / HEADS[1]}: sparse_linear must have one output")
    return heads[0], heads[1]


class BGEM3(Backend):
    """An XLM-R body with BGE-M3's two token heads; its forward is the body's."""

    def __init__(self, body: nn.Module, colbert_linear: nn.Linear, sparse_linear: nn.Linear):
        super().__init__()
        if colbert_linear.in_features != body.hidden_size or \
                sparse_linear.in_features != body.hidden_size:
            raise ModelLoadError(f"BGE-M3 heads read {colbert_linear.in_features} features; "
                                 f"the body gives {body.hidden_size}")
        self.body = body
        self.colbert_linear = colbert_linear
        self.sparse_linear = sparse_linear
        self.position_offset = body.position_offset
        self._dimensions = colbert_linear.out_features

    @property
    def hidden_size(self) -> int:
        return self.body.hidden_size

    @property
    def max_positions(self) -> int:
        return self.body.max_positions

    @property
    def multi_vector_dimensions(self) -> int:
        return self._dimensions

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return self.body(batch)  # [num_tokens, hidden]

    def rows(self, hidden: torch.Tensor, lengths: list[int], outputs: frozenset[EmbeddingType],
             normalize: bool) -> tuple[torch.Tensor, list[int]]:
        """The outputs of sequences packed in `hidden` [num_tokens, hidden] with `lengths`, as
        one flat float32 row each (concatenated) and each row's length."""
        weights = vectors = None
        if EmbeddingType.SPARSE in outputs:
            weights = torch.relu(self.sparse_linear(hidden)).float()[:, 0]  # [tokens]
        if EmbeddingType.MULTI_VECTOR in outputs:
            vectors = F.normalize(self.colbert_linear(hidden).float(), dim=-1)
        parts, counts, start = [], [], 0
        for n in lengths:
            size = 0
            if EmbeddingType.DENSE in outputs:
                dense = hidden[start].float()
                parts.append(F.normalize(dense, dim=-1) if normalize else dense)
                size += dense.numel()
            if weights is not None:
                parts.append(weights[start:start + n])
                size += n
            if vectors is not None:  # every token after [CLS]
                parts.append(vectors[start + 1:start + n].flatten())
                size += (n - 1) * vectors.shape[1]
            counts.append(size)
            start += n
        return torch.cat(parts), counts


@dataclass(frozen=True)
class M3Layout:
    """What unpacking a BGE-M3 row needs: the dense width, the token vectors' width, and the
    special tokens' ids (cls, eos, pad, unk) that lexical weights leave out, the vocabulary's
    size."""

    hidden_size: int
    dimensions: int
    special_ids: frozenset[int]
    vocab_size: int


@dataclass(frozen=True)
class M3Embeddings:
    """One input's outputs, on the host: what was not asked for is None."""

    dense: torch.Tensor | None            # [H]
    lexical: dict[int, float] | None      # token id -> weight
    multi_vector: torch.Tensor | None     # [T - 1, D]


def unpack(row: torch.Tensor, token_ids: list[int], outputs: frozenset[EmbeddingType],
           layout: M3Layout) -> M3Embeddings:
    """A sequence's flat row (see BGEM3.rows) split into its outputs; the lexical weights are
    FlagEmbedding's: per token id the largest weight above 0, special tokens dropped."""
    n, at = len(token_ids), 0
    dense = lexical = vectors = None
    if EmbeddingType.DENSE in outputs:
        dense, at = row[:layout.hidden_size], layout.hidden_size
    if EmbeddingType.SPARSE in outputs:
        weights, at = row[at:at + n].numpy(), at + n
        lexical = {}
        for token, weight in zip(token_ids, weights.tolist()):
            if token not in layout.special_ids and weight > 0 and weight > lexical.get(token, 0.0):
                lexical[token] = weight
    if EmbeddingType.MULTI_VECTOR in outputs:
        vectors = row[at:].reshape(max(n - 1, 0), layout.dimensions)
    return M3Embeddings(dense, lexical, vectors)


def sparse_arrays(lexical: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
    """Lexical weights as (int32 ids, float32 weights), largest first (ties: lower id first)."""
    ids = np.fromiter(lexical, dtype=np.int64, count=len(lexical))
    weights = np.fromiter(lexical.values(), dtype=np.float32, count=len(lexical))
    order = np.lexsort((ids, -weights))
    return ids[order].astype(np.int32), weights[order]


def hybrid_scores(query: M3Embeddings, document: M3Embeddings, weights: HybridWeights) -> float:
    """BGEM3FlagModel.compute_score's mix: the dense inner product, the lexical matching score
    (the sum over shared tokens of the weights' products) and MaxSim averaged over the query's
    vectors, weighted and divided by the weights' sum."""
    total = 0.0
    if weights.dense:
        total += weights.dense * float(query.dense @ document.dense)
    if weights.sparse:
        lexical = sum(w * document.lexical[t] for t, w in query.lexical.items()
                      if t in document.lexical)
        total += weights.sparse * lexical
    if weights.multi_vector:
        total += weights.multi_vector * float(maxsim(query.multi_vector, document.multi_vector,
                                                     mean=True))
    return total / weights.total
