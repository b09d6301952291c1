"""The one representation on the hot path: sequences packed end to end, no padding."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

import numpy as np
import torch

# CPU attention pads sequences of similar length together; a bucket may waste this fraction.
BUCKET_SLACK = 0.1
# Runs of sequences of at most this many tokens are attended as blocks of at most this many rows
# (AttentionBlock). MiniLM's float32 forward pass on 8, 64 and 512 queries (~21 tokens) ran at
# a median 1.09x, 1.05x and 1.04x of the buckets' speed with 64; 48 was as good, 96 worse, and
# 256 slower than buckets on 64 queries (0.92x: each row scored against ~10 others' keys).
BLOCK_TOKENS = 64
# Per LoRA adapter slot in a batch: its packed rows, a slice when they are one run.
AdapterRows = tuple[tuple[int, slice | torch.Tensor], ...]


@dataclass(frozen=True)
class AttentionBucket:
    """Sequences attended together on the CPU, padded to the longest of them.

    `rows` are their packed rows, in bucket order; `pad_index` places those rows in a
    [num_seqs * max_seqlen] block; `key_mask` ([num_seqs, 1, 1, max_seqlen] bool) is None when
    every sequence has the same length (then there is no padding at all). `start` is set when
    `rows` are the one range start:start + len(rows) in order (one sequence, or sequences of one
    length side by side): attention then reads a slice of the packed tensors, no gather.
    """

    rows: torch.Tensor
    pad_index: torch.Tensor
    key_mask: torch.Tensor | None
    num_seqs: int
    max_seqlen: int
    start: int | None = None


@dataclass(frozen=True)
class AttentionBlock:
    """Consecutive short sequences, rows start:stop, attended as one sequence whose `bias`
    ([rows, rows] float32, added to the scores: 0 where a row may attend to a column, -inf
    elsewhere) keeps each sequence to its own keys; None when the block is one sequence whose
    every token is a key. Against a bucket: no gather, no padding and no scatter, for a few more
    scores (each row against the block's width)."""

    start: int
    stop: int
    bias: torch.Tensor | None


@dataclass(frozen=True)
class PackedBatch:
    """Device tensors for one forward pass over `num_seqs` sequences of `num_tokens` in total."""

    input_ids: torch.Tensor        # [num_tokens] int64
    positions: torch.Tensor        # [num_tokens] int64, restarting at 0 for each sequence
    token_type_ids: torch.Tensor   # [num_tokens] int64
    cu_seqlens: torch.Tensor       # [num_seqs + 1] int32, sequence i is rows cu[i]:cu[i+1]
    prompt_lens: tuple[int, ...]
    max_seqlen: int
    # Image models: which sequences are images (no tokens), and their pixels [images, 3, H, W].
    is_image: tuple[bool, ...] = ()
    pixel_values: torch.Tensor | None = None
    # Per sequence, how many of its first tokens are attended to (keys); the rest still attend
    # (ColBERT's query expansion tokens). None: every token.
    key_lens: tuple[int, ...] | None = None
    # Per sequence, the slot of the LoRA adapter it runs with (engine/lora.py); 0 is the base
    # model. None: every sequence runs on the base model.
    adapters: tuple[int, ...] | None = None

    @cached_property
    def adapter_rows(self) -> AdapterRows:
        """Per adapter slot in the batch (not the base model's 0), the rows of its sequences,
        in slot order; built on first use and shared by every adapted layer."""
        if self.adapters is None:
            return ()
        cu = list(accumulate(self.prompt_lens, initial=0))
        members: dict[int, list[int]] = {}
        for i, slot in enumerate(self.adapters):
            if slot:
                members.setdefault(slot, []).append(i)
        out = []
        for slot in sorted(members):
            seqs = members[slot]
            if seqs[-1] - seqs[0] == len(seqs) - 1:  # consecutive sequences: one run of rows
                out.append((slot, slice(cu[seqs[0]], cu[seqs[-1] + 1])))
            else:
                rows = np.concatenate([np.arange(cu[i], cu[i + 1]) for i in seqs])
                out.append((slot, torch.from_numpy(rows).to(self.input_ids.device)))
        return tuple(out)

    @cached_property
    def buckets(self) -> tuple[AttentionBucket, ...]:
        """Padded attention groups, for devices without varlen attention; built on first use
        and shared by every layer."""
        return self._buckets(range(self.num_seqs))

    @cached_property
    def blocks(self) -> tuple[AttentionBlock | AttentionBucket, ...]:
        """Attention groups for bidirectional attention without a score bias, for devices
        without varlen attention: each run of consecutive sequences of at most BLOCK_TOKENS
        tokens as blocks of at most BLOCK_TOKENS rows, longer sequences in buckets; built on
        first use and shared by every layer."""
        cu = list(accumulate(self.prompt_lens, initial=0))
        runs: list[list[int]] = []  # each block's sequences
        long: list[int] = []
        for i, n in enumerate(self.prompt_lens):
            if n > BLOCK_TOKENS:
                long.append(i)
            elif runs and runs[-1][-1] == i - 1 and cu[i + 1] - cu[runs[-1][0]] <= BLOCK_TOKENS:
                runs[-1].append(i)
            else:
                runs.append([i])
        keys = self.key_lens or self.prompt_lens
        device = self.input_ids.device
        return tuple(_block(run, self.prompt_lens, keys, cu, device) for run in runs) \
            + self._buckets(long)

    def _buckets(self, seqs) -> tuple[AttentionBucket, ...]:
        """The sequences `seqs` (indices, in order) in buckets of similar length."""
        seqs = list(seqs)
        if not seqs:
            return ()
        cu = np.fromiter(accumulate(self.prompt_lens, initial=0), dtype=np.int64)
        device = self.input_ids.device
        keys = self.key_lens or self.prompt_lens
        lens = tuple(self.prompt_lens[i] for i in seqs)
        return tuple(_bucket([seqs[j] for j in members], self.prompt_lens, cu, device, keys)
                     for members in _group_by_length(lens))

    @cached_property
    def key_rows(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """With key_lens: the packed rows that are keys, their cu_seqlens and longest run, for
        varlen attention (keys packed on their own); None without."""
        if self.key_lens is None:
            return None
        cu = np.fromiter(accumulate(self.prompt_lens, initial=0), dtype=np.int64)
        rows = np.concatenate([np.arange(cu[i], cu[i] + k) for i, k in enumerate(self.key_lens)])
        cu_keys = np.fromiter(accumulate(self.key_lens, initial=0), dtype=np.int32)
        device = self.input_ids.device
        return (torch.from_numpy(rows).to(device), torch.from_numpy(cu_keys).to(device),
                max(self.key_lens))

    def split(self, max_tokens: int) -> list[PackedBatch]:
        """Consecutive runs of whole sequences of at most `max_tokens` tokens (a longer sequence
        alone), as batches of views of this one's tensors; their rows, in order, are this
        batch's rows."""
        parts, start, tokens = [], 0, 0
        for i, n in enumerate(self.prompt_lens):
            if i > start and tokens + n > max_tokens:
                parts.append((start, i))
                start, tokens = i, 0
            tokens += n
        if start == 0:
            return [self]
        parts.append((start, self.num_seqs))
        cu = list(accumulate(self.prompt_lens, initial=0))
        return [self._rows(cu, a, b) for a, b in parts]

    def by_length(self) -> tuple[PackedBatch, torch.Tensor]:
        """The same sequences, shortest first, and where each of this batch's rows went:
        `hidden_sorted[rows]` puts a forward pass's rows back in this batch's order."""
        lens = np.asarray(self.prompt_lens)
        order = np.argsort(lens, kind="stable")
        cu = np.fromiter(accumulate(self.prompt_lens, initial=0), dtype=np.int64)
        perm = np.concatenate([np.arange(cu[i], cu[i + 1]) for i in order])  # sorted -> ours
        rows = np.empty_like(perm)
        rows[perm] = np.arange(perm.size)
        device = self.input_ids.device
        perm_t = torch.from_numpy(perm).to(device)
        sorted_cu = np.fromiter(accumulate(lens[order], initial=0), dtype=np.int32)
        keys = None if self.key_lens is None else tuple(self.key_lens[i] for i in order)
        adapters = None if self.adapters is None else tuple(self.adapters[i] for i in order)
        return (PackedBatch(input_ids=self.input_ids[perm_t], positions=self.positions[perm_t],
                            token_type_ids=self.token_type_ids[perm_t],
                            cu_seqlens=torch.from_numpy(sorted_cu).to(device),
                            prompt_lens=tuple(int(n) for n in lens[order]),
                            max_seqlen=self.max_seqlen, key_lens=keys, adapters=adapters),
                torch.from_numpy(rows).to(device))

    def _rows(self, cu: list[int], first: int, stop: int) -> PackedBatch:
        rows = slice(cu[first], cu[stop])
        lens = self.prompt_lens[first:stop]
        keys = None if self.key_lens is None else self.key_lens[first:stop]
        adapters = None if self.adapters is None else self.adapters[first:stop]
        return PackedBatch(input_ids=self.input_ids[rows], positions=self.positions[rows],
                           token_type_ids=self.token_type_ids[rows],
                           cu_seqlens=self.cu_seqlens[first:stop + 1] - cu[first],
                           prompt_lens=lens, max_seqlen=max(lens), key_lens=keys,
                           adapters=adapters)

    @property
    def num_seqs(self) -> int:
        return len(self.prompt_lens)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @classmethod
    def build(cls, token_ids: list[list[int]], token_type_ids: list[list[int]] | None,
              device: torch.device, position_offset: int = 0,
              pixels: list[torch.Tensor | None] | None = None,
              pixel_dtype: torch.dtype = torch.float32,
              key_lens: list[int] | None = None,
              adapters: list[int] | None = None) -> PackedBatch:
        """Packs on the host with numpy, then one copy per tensor to the device.

        `position_offset` shifts position ids (RoBERTa counts positions from padding_idx + 1).
        `pixels`: per sequence, an image's [3, H, W] pixels (its token ids are empty) or None.
        `key_lens`: per sequence, how many of its first tokens are attended to (None: all).
        `adapters`: per sequence, its LoRA adapter's slot (None, or all 0: the base model).
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

        def dev(a: np.ndarray) -> torch.Tensor:
            host = torch.from_numpy(a)
            if device.type == "cuda":  # page-locked, so the copy overlaps the running batch
                host = host.pin_memory()
            return host.to(device, non_blocking=True)

        is_image, pixel_values = (), None
        if pixels is not None and any(p is not None for p in pixels):
            is_image = tuple(p is not None for p in pixels)
            pixel_values = torch.stack([p for p in pixels if p is not None]).to(device,
                                                                                pixel_dtype)
        return cls(input_ids=dev(ids), positions=dev(positions + position_offset),
                   token_type_ids=dev(types), cu_seqlens=dev(cu.astype(np.int32)),
                   prompt_lens=tuple(lens), max_seqlen=max_seqlen,
                   is_image=is_image or (False,) * len(lens), pixel_values=pixel_values,
                   key_lens=None if key_lens is None or list(key_lens) == lens
                   else tuple(key_lens),
                   adapters=tuple(adapters) if adapters is not None and any(adapters) else None)


def _group_by_length(lens: tuple[int, ...]) -> list[list[int]]:
    """Sequences sorted longest first, cut into groups whose padding stays within the slack."""
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    groups: list[list[int]] = []
    for i in order:
        group = groups[-1] if groups else None
        if group and (len(group) + 1) * lens[group[0]] <= \
                (1 + BUCKET_SLACK) * (sum(lens[j] for j in group) + lens[i]):
            group.append(i)
        else:
            groups.append([i])
    return groups


def _block(members: list[int], lens: tuple[int, ...], keys: tuple[int, ...], cu: list[int],
           device: torch.device) -> AttentionBlock:
    """The block of consecutive sequences `members`."""
    start, stop = cu[members[0]], cu[members[-1] + 1]
    if len(members) == 1 and keys[members[0]] == lens[members[0]]:
        return AttentionBlock(start, stop, None)
    sizes = [lens[i] for i in members]
    seq = np.repeat(np.arange(len(members)), sizes)  # each row's sequence in the block
    position = np.arange(stop - start) - np.repeat(np.asarray(cu[members[0]:members[-1] + 1])
                                                   - start, sizes)
    is_key = position < np.repeat(np.asarray([keys[i] for i in members]), sizes)
    attend = (seq[:, None] == seq[None, :]) & is_key[None, :]  # [rows, rows]
    bias = np.where(attend, np.float32(0), np.float32(-np.inf))
    return AttentionBlock(start, stop, torch.from_numpy(bias).to(device))


def _bucket(members: list[int], lens: tuple[int, ...], cu: np.ndarray,
            device: torch.device, keys: tuple[int, ...]) -> AttentionBucket:
    width = lens[members[0]]
    rows = np.concatenate([np.arange(cu[i], cu[i + 1]) for i in members])
    pad_index = np.concatenate([k * width + np.arange(lens[i]) for k, i in enumerate(members)])
    key_mask = None
    if any(keys[i] != width for i in members):  # padding, or tokens no one attends to
        sizes = torch.tensor([keys[i] for i in members])
        key_mask = (torch.arange(width)[None, :] < sizes[:, None])[:, None, None, :].to(device)
    in_order = all(b == a + 1 for a, b in zip(members, members[1:]))
    return AttentionBucket(rows=torch.from_numpy(rows).to(device),
                           pad_index=torch.from_numpy(pad_index).to(device), key_mask=key_mask,
                           num_seqs=len(members), max_seqlen=width,
                           start=int(cu[members[0]]) if in_order else None)
