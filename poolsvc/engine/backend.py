"""The contract every model family implements for the engine: packed encoders and decoders
(models/bert.py, llama.py, ...), the transformers fallback (models/hf_fallback.py) and the dual
encoders (models/dual.py). The engine reads a model's kind and capabilities from these declared
attributes, never by probing for methods."""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from poolsvc.engine.description import Kind
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.params import PoolingType


@runtime_checkable
class ModelBackend(Protocol):
    kind: ClassVar[Kind]
    # Where a task checkpoint's head reads: one pooled row (CLS, LAST) or every token (ALL).
    # None for bodies without a head.
    head_pooling: ClassVar[PoolingType | None]
    # A body's pooling when no Sentence-Transformers files say otherwise.
    default_pooling: ClassVar[PoolingType]
    # Checkpoint names of task models nest the body under this prefix ("bert.", "model.").
    weight_prefix: ClassVar[str]
    position_offset: int          # the first position id (RoBERTa: padding_idx + 1)
    hidden_size: int              # the width of forward()'s rows
    max_positions: int            # the longest input, in tokens
    num_labels: int               # the head's outputs; 0 without a head
    modalities: tuple[str, ...]   # "text", and "image" for image models
    image_tokens: int             # what one image costs in the batch token budget

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Hidden states [num_tokens, hidden_size]; for dual encoders, whose towers pool
        themselves, one row per sequence [num_seqs, hidden_size]."""

    def head(self, rows: torch.Tensor) -> torch.Tensor:
        """The checkpoint's head on pooled rows: [rows, num_labels] logits (models with a head)."""


class Backend(nn.Module):
    """Defaults of the contract for text models; families override what differs."""

    kind: ClassVar[Kind] = Kind.EMBEDDING
    head_pooling: ClassVar[PoolingType | None] = None
    default_pooling: ClassVar[PoolingType] = PoolingType.CLS
    weight_prefix: ClassVar[str] = ""
    position_offset = 0
    num_labels = 0
    modalities = ("text",)
    image_tokens = 0

    def head(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no task head")
