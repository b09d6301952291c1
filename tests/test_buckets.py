"""The CPU attention buckets: every sequence in one, padding within the slack."""

from __future__ import annotations

import pytest
import torch

from poolsvc.engine.packing import BUCKET_SLACK, PackedBatch, _group_by_length


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
