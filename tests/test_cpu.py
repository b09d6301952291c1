"""The CPU fast path (engine/cpu.py) keeps every family equal to transformers, and the attention
shortcuts (short sequences in masked blocks, in-order buckets read as slices) equal each sequence
attended alone."""

from __future__ import annotations

import os

# The model test modules build transformers classes at import, which imports triton: this must
# be set first, as in test_kernels.py, or its interpreted kernels cannot run later in the session.
os.environ.setdefault("TRITON_INTERPRET", "1")

import ctypes  # noqa: E402
import threading  # noqa: E402

import pytest  # noqa: E402
import test_models_decoder as dec  # noqa: E402
import test_models_encoder as enc  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tiny_models import load_ours, tiny_bert  # noqa: E402

from poolsvc.engine import cpu, native, packing  # noqa: E402
from poolsvc.engine.config import EngineConfig, ModelSpec  # noqa: E402
from poolsvc.engine.engine import Engine  # noqa: E402
from poolsvc.engine.layers import qkv_attention, varlen_attention  # noqa: E402
from poolsvc.engine.packing import AttentionBlock, AttentionBucket, PackedBatch  # noqa: E402
from poolsvc.engine.params import Task  # noqa: E402
from poolsvc.engine.request import PoolingRequest  # noqa: E402
from poolsvc.engine.served import ServedModel  # noqa: E402

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
        for binary, op in (("add", torch.add), ("mul", torch.mul)):
            fused = cpu.PackedLinear.of(linear, binary=binary)
            assert (fused(x, residual) - op(linear(x), residual)).abs().max() <= 1e-5
            with pytest.raises(TypeError, match="pass `other`"):
                fused(x)
        with pytest.raises(TypeError, match="pass `other`"):
            packed(x, residual)
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-5
    assert packed(x[:0]).shape == (0, 80)


def created(capfd, fn) -> list[str]:
    """The oneDNN kernels that fn() builds (misses of oneDNN's kernel cache, which is the
    process's), from oneDNN's own log."""
    capfd.readouterr()
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
        fn()
        ctypes.CDLL(None).fflush(None)  # oneDNN prints through C's buffered stdout
    return [line for line in capfd.readouterr().out.splitlines() if "create:cache_miss" in line]


@torch.inference_mode()
def test_warm_builds_each_product_kernel_for_every_short_block(capfd):
    """cpu.warm builds each distinct product's kernel for 1..EXACT_ROWS rows, for the calling
    thread's thread count (oneDNN keys kernels by it); the shapes here are used by no other
    test, so their kernels start unbuilt."""
    torch.manual_seed(3)

    def layers(d: int) -> torch.nn.ModuleList:
        return torch.nn.ModuleList([
            cpu.PackedLinear.of(torch.nn.Linear(d, 56)),
            cpu.PackedLinear.of(torch.nn.Linear(d, 56)),  # the same kernel as the first
            cpu.PackedLinear.of(torch.nn.Linear(d, 56), gelu="tanh"),
            cpu.PackedLinear.of(torch.nn.Linear(56, d), binary="add"),
            cpu.PackedLinear.of(torch.nn.Linear(56, d, bias=False), binary="mul")])

    def run(model: torch.nn.ModuleList, d: int):
        def go():
            for rows in range(1, cpu.EXACT_ROWS + 1):
                x = torch.randn(rows, d)
                h = model[0](x) + model[1](x) + model[2](x)
                model[4](h, model[3](h, x))
        return go

    threads = torch.get_num_threads()
    cold, warmed = layers(40), layers(24)
    assert cpu.warm(warmed) == 4 * cpu.EXACT_ROWS  # four distinct kernels
    assert created(capfd, run(warmed, 24)) == []
    # the control: without warm, each kernel is built on first use
    assert len(created(capfd, run(cold, 40))) >= 4 * cpu.EXACT_ROWS
    try:  # warmed for another thread count, they are built again
        torch.set_num_threads(threads + 1)
        assert len(created(capfd, run(warmed, 24))) >= 4 * cpu.EXACT_ROWS
    finally:
        torch.set_num_threads(threads)


def test_a_started_engine_builds_no_kernel_for_short_texts(tmp_path, minilm_path, capfd):
    """The engine warms up on its runner's thread, with the runner's threads: after start,
    texts of every length up to EXACT_ROWS tokens run on kernels already built (warmed on the
    loading thread's one thread, each length's first text built its own, +3-4 ms)."""
    bert = tiny_bert(tmp_path / "bert", minilm_path, seed=5)
    engine = Engine(EngineConfig(models=(ModelSpec(str(bert)),), device="cpu", threads=2))
    engine.start()
    try:
        def embed_each_length():
            for words in range(cpu.EXACT_ROWS - 1):  # [CLS] + words + [SEP]: 2..EXACT_ROWS
                out = engine.submit(PoolingRequest(Task.EMBED, (" ".join(["word"] * words),)))
                assert out.result(30).embeddings.shape == (1, 48)

        assert created(capfd, embed_each_length) == []
    finally:
        engine.shutdown()


def test_a_failed_warm_up_fails_start(tmp_path, minilm_path, monkeypatch):
    """A warm-up that raises on the runner's thread raises from start, and the engine's threads
    end."""
    bert = tiny_bert(tmp_path / "bert", minilm_path, seed=6)

    def broken(self):
        raise RuntimeError("warm-up broke")

    monkeypatch.setattr(ServedModel, "warm_up", broken)
    engine = Engine(EngineConfig(models=(ModelSpec(str(bert)),), device="cpu", threads=1))
    with pytest.raises(RuntimeError, match="warm-up broke"):
        engine.start()
    assert not engine.ready
    engine.shutdown()  # returns: the runner has ended
    assert not [t for t in threading.enumerate() if t.name.startswith("poolsvc-")]


def test_joined_linears_split_back():
    torch.manual_seed(1)
    parts = [torch.nn.Linear(32, n) for n in (32, 16, 16)]
    parts[1].bias = None  # a missing bias counts as zero
    x = torch.randn(5, 32)
    got = cpu.PackedLinear.of(*parts)(x).split([32, 16, 16], dim=1)
    for part, out in zip(parts, got):
        assert (out - part(x)).abs().max() <= 1e-5


def kernels(path: str) -> native.Kernels | None:
    """The kernels a test's optimized model runs: "onednn" (none: oneDNN's products, PyTorch's
    attention), "native" (linear.cpp and attention.cpp, built) or "native-attention" (oneDNN's
    products, as on a CPU without AVX-512)."""
    if path == "onednn":
        return None
    built = native.load()
    if built is None:
        pytest.skip("the native kernels cannot be built here (no C++ compiler)")
    return built if path == "native" else native.Kernels(built.attention, None)


@pytest.mark.parametrize("path", ["onednn", "native", "native-attention"])
@pytest.mark.parametrize("case", enc.BODIES, ids=enc._name)
def test_encoder_bodies_match_transformers(tmp_path, case, path):
    ours_cls, hf_class, hf_config, sizes, pairs = case
    init = {"add_pooling_layer": False} if hf_class is enc.transformers.BertModel else {}
    hf = enc.save_hf(tmp_path, hf_class, hf_config(**sizes), seed=1, **init)
    ours = load_ours(ours_cls, tmp_path)
    assert cpu.optimize(ours, kernels(path)) == 4 * sizes["num_hidden_layers"]
    token_ids, token_types = enc.random_sequences(ours.max_positions, seed=2, pairs=pairs)
    (hidden, want), _ = enc.run_both(ours, hf, None, token_ids, token_types)
    assert enc.max_diff(hidden, want) <= enc.ATOL


@pytest.mark.parametrize("path", ["onednn", "native"])
@pytest.mark.parametrize("case", enc.TASKS, ids=enc._name)
def test_encoder_classifiers_match_transformers(tmp_path, case, path):
    ours_cls, _, hf_class, hf_config, sizes = case
    hf = enc.save_hf(tmp_path, hf_class, hf_config(**sizes, num_labels=3), seed=3)
    ours = load_ours(ours_cls, tmp_path)
    cpu.optimize(ours, kernels(path))
    token_ids, token_types = enc.random_sequences(ours.max_positions, seed=4,
                                                  pairs=sizes["type_vocab_size"] > 1)
    (hidden, want_hidden), (logits, want_logits) = enc.run_both(
        ours, hf.base_model, hf, token_ids, token_types)
    assert enc.max_diff(hidden, want_hidden) <= enc.ATOL
    assert enc.max_diff(logits, want_logits) <= enc.ATOL


@torch.no_grad()
@pytest.mark.parametrize("path", ["onednn", "native"])
@pytest.mark.parametrize("case", ["llama-biases", "mistral", "qwen2", "qwen3"])
def test_decoder_bodies_match_transformers(tmp_path, case, path):
    family, cls, overrides, _ = dec.BODIES[case]
    ref = dec.hf_model(family, "Model", **overrides)
    ref.save_pretrained(tmp_path)
    ours = load_ours(cls, tmp_path)
    assert cpu.optimize(ours, kernels(path)) == 7 * dec.TINY["num_hidden_layers"]
    seqs = dec.token_ids()
    want = dec.hf_hidden(ref, seqs)
    assert dec.max_diff(ours(dec.packed(seqs)), want) <= dec.TOL
    assert dec.max_diff(ours(dec.packed(seqs[2:3])), want[24:85]) <= dec.TOL


@torch.no_grad()
@pytest.mark.parametrize("path", ["onednn", "native"])
def test_bfloat16_bert_tracks_float32(tmp_path, path):
    if not cpu.supports(torch.bfloat16):
        pytest.skip("no bfloat16 oneDNN kernels on this CPU")
    enc.save_hf(tmp_path, enc.transformers.BertModel, enc.transformers.BertConfig(**enc.BERT),
                seed=1, add_pooling_layer=False)
    want = load_ours(enc.BertModel, tmp_path)
    ours = load_ours(enc.BertModel, tmp_path).to(torch.bfloat16)
    cpu.optimize(ours, kernels(path))
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
