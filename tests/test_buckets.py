"""The CPU attention groups: short sequences in blocks, the rest in buckets whose padding stays
within the slack; every row in exactly one."""

from __future__ import annotations

import pytest
import torch

from poolsvc.engine.packing import (
    BLOCK_TOKENS,
    BUCKET_SLACK,
    AttentionBlock,
    PackedBatch,
    _group_by_length,
)


@pytest.mark.parametrize("lens", [[5], [7, 7, 7], [256, 250, 240, 30, 29, 3, 1],
                                  list(range(1, 60))])
def test_buckets_cover_every_sequence_and_bound_the_padding(lens):
    groups = _group_by_length(tuple(lens))
    assert sorted(i for g in groups for i in g) == list(range(len(lens)))
    for group in groups:
        padded = len(group) * max(lens[i] for i in group)
        assert padded <= (1 + BUCKET_SLACK) * sum(lens[i] for i in group)
    batch = PackedBatch.build([[1] * n for n in lens], None, torch.device("cpu"))
    rows = torch.cat([b.rows for b in batch.buckets]).sort().values
    assert torch.equal(rows, torch.arange(sum(lens)))


@pytest.mark.parametrize("lens", [[5], [64], [65], [30, 34, 1, 70, 64, 2, 3, 200, 9],
                                  list(range(1, 90))])
def test_blocks_hold_whole_short_sequences_and_cover_every_row(lens):
    batch = PackedBatch.build([[1] * n for n in lens], None, torch.device("cpu"))
    cu = batch.cu_seqlens.tolist()
    rows = []
    for group in batch.blocks:
        if isinstance(group, AttentionBlock):
            assert group.stop - group.start <= BLOCK_TOKENS
            assert group.start in cu and group.stop in cu  # whole sequences
            rows.append(torch.arange(group.start, group.stop))
        else:  # sequences longer than a block, padded with those of similar length
            assert min(lens[cu.index(int(r))] for r in group.rows if int(r) in cu) > BLOCK_TOKENS
            rows.append(group.rows)
    assert torch.equal(torch.cat(rows).sort().values, torch.arange(sum(lens)))
