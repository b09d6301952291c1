"""What the engine hands back: host arrays ready to be sent as packed bytes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from poolsvc.engine.params import OutputDType, Timing


def to_numpy(t: torch.Tensor, dtype: OutputDType) -> np.ndarray:
    """float32/float16 arrays, or the raw bits of bfloat16 as uint16 (numpy has no bfloat16)."""
    if dtype is OutputDType.FLOAT32:
        return t.to(torch.float32).contiguous().numpy()
    if dtype is OutputDType.FLOAT16:
        return t.to(torch.float16).contiguous().numpy()
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


@dataclass(frozen=True)
class EmbedOutput:
    model: str                      # served name of the model that ran
    embeddings: np.ndarray          # [num_inputs, dimensions] in the requested dtype
    dtype: OutputDType
    token_ids: list[list[int]]      # what the model saw, per input
    timing: Timing

    @property
    def prompt_lens(self) -> list[int]:
        return [len(t) for t in self.token_ids]

    @classmethod
    def build(cls, model: str, vectors: torch.Tensor, dtype: OutputDType,
              token_ids: list[list[int]], timing: Timing) -> EmbedOutput:
        return cls(model, to_numpy(vectors, dtype), dtype, token_ids, timing)
