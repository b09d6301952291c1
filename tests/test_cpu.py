"""The CPU fast path (engine/cpu.py) keeps every family equal to transformers, and the attention
shortcuts (short sequences in masked blocks, in-order buckets read as slices) equal each sequence
attended alone."""

from __future__ import annotations

import os

# The model test modules build transformers classes at import, which imports triton: this must
# be set first, as in test_kernels.py, or its interpreted kernels cannot run later in the session.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import test_models_decoder as dec  # noqa: E402
import test_models_encoder as enc  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tiny_models import load_ours  # noqa: E402

from poolsvc.engine import cpu, packing  # noqa: E402
from poolsvc.engine.layers import qkv_attention, varlen_attention  # noqa: E402
from poolsvc.engine.packing import AttentionBlock, AttentionBucket, PackedBatch  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu.supports(torch.float32),
                                reason="this torch build has no oneDNN")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Slices of 40 tokens, blocks of 32 rows padded from 9 rows on, so these small batches
    take the sliced, several-block and padded paths too."""
    monkeypatch.setattr(cpu, "SLICE_TOKENS", 40)
    monkeypatch.setattr(cpu, "ROW_BLOCK", 32)
    monkeypatch.setattr(cpu, "EXACT_ROWS", 8)


def test_blocks_pad_to_a_bounded_set_of_shapes(monkeypatch):
    seen = []

    def fn(x, y):
        seen.append(x.shape[0])
        return x + y

    x, y = torch.randn(75, 3), torch.randn(75, 3)
    assert torch.equal(cpu.by_blocks(fn, x, y), x + y)
    assert seen == [32, 32, 16]  # 75 = 32 + 32 + 11, the last padded to a multiple of 16
    monkeypatch.setattr(cpu, "EXACT_ROWS", 16)
    assert torch.equal(cpu.by_blocks(fn, x, y), x + y)
    assert seen[3:] == [32, 32, 11]  # small blocks keep their rows


@pytest.mark.parametrize("gelu", [None, "none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_linear(gelu, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80, bias=bias)
    x, residual = torch.randn(37, 96), torch.randn(37, 80)
    want = linear(x)
    packed = cpu.PackedLinear.of(linear, gelu=gelu)
    got = packed(x)
    if gelu is not None:
        want = F.gelu(want, approximate=gelu)
    else:
        assert (packed.add(x, residual) - (linear(x) + residual)).abs().max() <= 1e-5
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-5
    assert packed(x[:0]).shape == (0, 80)


def test_joined_linears_split_back():
    torch.manual_seed(1)
    parts = [torch.nn.Linear(32, n) for n in (32, 16, 16)]
    parts[1].bias = None  # a missing bias counts as zero
    x = torch.randn(5, 32)
    got = cpu.PackedLinear.of(*parts)(x).split([32, 16, 16], dim=1)
    for part, out in zip(parts, got):
        assert (out - part(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("case", enc.BODIES, ids=enc._name)
def test_encoder_bodies_match_transformers(tmp_path, case):
    ours_cls, hf_class, hf_config, sizes, pairs = case
    init = {"add_pooling_layer": False} if hf_class is enc.transformers.BertModel else {}
    hf = enc.save_hf(tmp_path, hf_class, hf_config(**sizes), seed=1, **init)
    ours = load_ours(ours_cls, tmp_path)
    assert cpu.optimize(ours) == 4 * sizes["num_hidden_layers"]
    token_ids, token_types = enc.random_sequences(ours.max_positions, seed=2, pairs=pairs)
    (hidden, want), _ = enc.run_both(ours, hf, None, token_ids, token_types)
    assert enc.max_diff(hidden, want) <= enc.ATOL


@pytest.mark.parametrize("case", enc.TASKS, ids=enc._name)
def test_encoder_classifiers_match_transformers(tmp_path, case):
    ours_cls, _, hf_class, hf_config, sizes = case
    hf = enc.save_hf(tmp_path, hf_class, hf_config(**sizes, num_labels=3), seed=3)
    ours = load_ours(ours_cls, tmp_path)
    cpu.optimize(ours)
    token_ids, token_types = enc.random_sequences(ours.max_positions, seed=4,
                                                  pairs=sizes["type_vocab_size"] > 1)
    (hidden, want_hidden), (logits, want_logits) = enc.run_both(
        ours, hf.base_model, hf, token_ids, token_types)
    assert enc.max_diff(hidden, want_hidden) <= enc.ATOL
    assert enc.max_diff(logits, want_logits) <= enc.ATOL


@torch.no_grad()
@pytest.mark.parametrize("case", ["llama-biases", "mistral", "qwen2", "qwen3"])
def test_decoder_bodies_match_transformers(tmp_path, case):
    family, cls, overrides, _ = dec.BODIES[case]
    ref = dec.hf_model(family, "Model", **overrides)
    ref.save_pretrained(tmp_path)
    ours = load_ours(cls, tmp_path)
    assert cpu.optimize(ours) == 7 * dec.TINY["num_hidden_layers"]
    seqs = dec.token_ids()
    want = dec.hf_hidden(ref, seqs)
    assert dec.max_diff(ours(dec.packed(seqs)), want) <= dec.TOL
    assert dec.max_diff(ours(dec.packed(seqs[2:3])), want[24:85]) <= dec.TOL


@torch.no_grad()
def test_bfloat16_bert_tracks_float32(tmp_path):
    if not cpu.supports(torch.bfloat16):
        pytest.skip("no bfloat16 oneDNN kernels on this CPU")
    enc.save_hf(tmp_path, enc.transformers.BertModel, enc.transformers.BertConfig(**enc.BERT),
                seed=1, add_pooling_layer=False)
    want = load_ours(enc.BertModel, tmp_path)
    ours = load_ours(enc.BertModel, tmp_path).to(torch.bfloat16)
    cpu.optimize(ours)
    token_ids, _ = enc.random_sequences(want.max_positions, seed=2, pairs=False)
    batch = PackedBatch.build(token_ids, None, torch.device("cpu"))
    got = ours(batch)
    assert got.dtype == torch.bfloat16
    assert F.cosine_similarity(got.float(), want(batch), dim=1).min() >= 0.999


@torch.no_grad()
@pytest.mark.parametrize("lens", [[9], [6, 6, 6], [5, 5, 9, 9], [9, 9, 5, 5], [3, 8, 3]])
@pytest.mark.parametrize("causal", [False, True])
def test_in_order_buckets_read_slices(lens, causal):
    """One sequence, or runs of equal length, take slices of q, k, v; the rest gathers."""
    torch.manual_seed(2)
    batch = PackedBatch.build([[1] * n for n in lens], None, torch.device("cpu"))
    qkv = torch.randn(sum(lens), 3, 4, 8).unbind(1)  # strided, as the joined projection gives
    want = torch.cat([  # each sequence on its own
        F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in qkv),
                                       is_causal=causal).transpose(0, 1)
        for a, b in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist())])
    assert (varlen_attention(*qkv, batch, causal=causal) - want).abs().max() <= 1e-5
    if not causal:  # gathered once for the three
        assert (qkv_attention(torch.stack(qkv, 1), batch) - want).abs().max() <= 1e-5
    starts = [b.start for b in batch.buckets]
    assert (starts == [0]) == (len(set(lens)) == 1)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens, key_lens, groups", [
    ([3, 5, 2, 7, 4], None, [(AttentionBlock, 0, 8), (AttentionBlock, 8, 10),
                             (AttentionBlock, 10, 17), (AttentionBlock, 17, 21)]),
    ([12, 3, 4, 20, 2, 2], None, [(AttentionBlock, 12, 19), (AttentionBlock, 39, 43),
                                  (AttentionBucket, 19, 39), (AttentionBucket, 0, 12)]),
    ([5, 6, 3], [2, 6, 1], [(AttentionBlock, 0, 5), (AttentionBlock, 5, 11),
                            (AttentionBlock, 11, 14)]),  # ColBERT: only the first keys attended
])
def test_blocks_equal_each_sequence_alone(monkeypatch, dtype, lens, key_lens, groups):
    """Runs of sequences of at most BLOCK_TOKENS tokens (8 here) are attended side by side in
    blocks of at most 8 rows, longer ones in buckets; every row sees its own sequence's keys
    only, in float32 (two products) and bfloat16 (SDPA) alike."""
    monkeypatch.setattr(packing, "BLOCK_TOKENS", 8)
    torch.manual_seed(3)
    batch = PackedBatch.build([[1] * n for n in lens], None, torch.device("cpu"),
                              key_lens=key_lens)
    got_groups = [(type(g), g.start, g.stop) if isinstance(g, AttentionBlock)
                  else (type(g), g.start, g.start + g.rows.numel()) for g in batch.blocks]
    assert got_groups == groups
    qkv = torch.randn(sum(lens), 3, 4, 8)
    keys = key_lens or lens
    cu = batch.cu_seqlens.tolist()
    want = torch.cat([  # each sequence alone, in float32, on its first keys[i] keys
        F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[:, :n] if j else
                                         t[a:b].transpose(0, 1) for j, t in enumerate(
                                             qkv.unbind(1)))).transpose(0, 1)
        for a, b, n in zip(cu[:-1], cu[1:], keys)])
    tol = 1e-5 if dtype is torch.float32 else 3e-2
    assert (qkv_attention(qkv.to(dtype), batch).float() - want).abs().max() <= tol
    assert (varlen_attention(*qkv.to(dtype).unbind(1), batch).float() - want).abs().max() <= tol


def test_split_and_sort_keep_every_row():
    batch = PackedBatch.build([[i] * n for i, n in enumerate([5, 30, 2, 17, 40, 3])], None,
                              torch.device("cpu"))
    parts = batch.split(35)
    assert [p.prompt_lens for p in parts] == [(5, 30), (2, 17), (40,), (3,)]
    assert torch.equal(torch.cat([p.input_ids for p in parts]), batch.input_ids)
    assert torch.equal(torch.cat([p.positions for p in parts]), batch.positions)
    assert [p.cu_seqlens.tolist() for p in parts][:2] == [[0, 5, 35], [0, 2, 19]]
    ordered, rows = batch.by_length()
    assert ordered.prompt_lens == (2, 3, 5, 17, 30, 40)
    assert torch.equal(ordered.input_ids[rows], batch.input_ids)
    assert torch.equal(ordered.positions[rows], batch.positions)
