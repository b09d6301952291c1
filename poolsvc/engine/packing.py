"""The one representation on the hot path: sequences packed end to end, no padding."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import numpy as np
import torch


@dataclass(frozen=True)
class PackedBatch:
    """Device tensors for one forward pass over `num_seqs` sequences of `num_tokens` in total."""

    input_ids: torch.Tensor        # [num_tokens] int64
    positions: torch.Tensor        # [num_tokens] int64, restarting at 0 for each sequence
    token_type_ids: torch.Tensor   # [num_tokens] int64
    cu_seqlens: torch.Tensor       # [num_seqs + 1] int32, sequence i is rows cu[i]:cu[i+1]
    prompt_lens: tuple[int, ...]
    max_seqlen: int
    # CPU attention only: packed row -> row of a [num_seqs * max_seqlen] padded block, and the
    # key-padding mask of that block ([num_seqs, 1, 1, max_seqlen] bool).
    pad_index: torch.Tensor | None
    key_mask: torch.Tensor | None

    @property
    def num_seqs(self) -> int:
        return len(self.prompt_lens)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @classmethod
    def build(cls, token_ids: list[list[int]], token_type_ids: list[list[int]] | None,
              device: torch.device, position_offset: int = 0) -> PackedBatch:
        """Packs on the host with numpy, then one copy per tensor to the device.

        `position_offset` shifts position ids (RoBERTa counts positions from padding_idx + 1).
        """
        lens = [len(t) for t in token_ids]
        cu = np.fromiter(accumulate(lens, initial=0), dtype=np.int64, count=len(lens) + 1)
        num_tokens, max_seqlen = int(cu[-1]), max(lens)
        ids = np.fromiter((i for t in token_ids for i in t), dtype=np.int64, count=num_tokens)
        seq_of_token = np.repeat(np.arange(len(lens)), lens)
        positions = np.arange(num_tokens, dtype=np.int64) - cu[:-1][seq_of_token]
        if token_type_ids is None:
            types = np.zeros(num_tokens, dtype=np.int64)
        else:
            types = np.fromiter((i for t in token_type_ids for i in t), dtype=np.int64,
                                count=num_tokens)
        pad_index = key_mask = None
        if device.type != "cuda" and len(lens) > 1:
            pad_index = torch.from_numpy(seq_of_token * max_seqlen + positions).to(device)
            key_mask = (torch.arange(max_seqlen)[None, :] < torch.tensor(lens)[:, None])
            key_mask = key_mask[:, None, None, :].to(device)

        def dev(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(device, non_blocking=True)

        return cls(input_ids=dev(ids), positions=dev(positions + position_offset),
                   token_type_ids=dev(types), cu_seqlens=dev(cu.astype(np.int32)),
                   prompt_lens=tuple(lens), max_seqlen=max_seqlen, pad_index=pad_index,
                   key_mask=key_mask)
