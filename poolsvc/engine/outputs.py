"""What the engine hands back: host arrays ready to be sent as packed bytes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from poolsvc.engine.params import OutputDType, Task, Timing


def to_numpy(t: torch.Tensor, dtype: OutputDType) -> np.ndarray:
    """float32/float16 arrays, or the raw bits of bfloat16 as uint16 (numpy has no bfloat16)."""
    if dtype is OutputDType.FLOAT32:
        return t.to(torch.float32).contiguous().numpy()
    if dtype is OutputDType.FLOAT16:
        return t.to(torch.float16).contiguous().numpy()
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


@dataclass(frozen=True)
class Output:
    model: str                      # served name of the model that ran
    token_ids: list[list[int]]      # what the model saw, per input (per pair for cross-encoders)
    timing: Timing

    @property
    def prompt_lens(self) -> list[int]:
        return [len(t) for t in self.token_ids]


@dataclass(frozen=True)
class EmbedOutput(Output):
    embeddings: np.ndarray          # [num_inputs, dimensions] in `dtype`
    dtype: OutputDType


@dataclass(frozen=True)
class ClassifyOutput(Output):
    probs: np.ndarray               # [num_inputs, num_labels] in `dtype`
    dtype: OutputDType
    labels: list[str]


@dataclass(frozen=True)
class ScoreOutput(Output):
    scores: np.ndarray              # [num_pairs] float32


@dataclass(frozen=True)
class EncodeOutput(Output):
    task: Task
    outputs: list[np.ndarray]       # per input: [rows, D] (per-token tasks) or [D]
    dtype: OutputDType
