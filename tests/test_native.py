"""engine/native.py and attention.cpp: the kernel equals attention computed per sequence, in
float32 and bfloat16, for any head size it takes; what it refuses; how the kernels are built and
cached, and what happens without a compiler. (linear.cpp: test_native_linear.py; whole models
through both: test_cpu.py and test_models_families.py, "native".)"""

from __future__ import annotations

import logging
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from poolsvc.engine import native
from poolsvc.engine.packing import PackedBatch

COMPILER = shutil.which("c++") or shutil.which("g++")


@pytest.fixture(scope="module")
def kernel(native_kernels):
    return native_kernels.attention


def packed(lens: list[int], key_lens: list[int] | None = None) -> PackedBatch:
    ids = [list(range(1, n + 1)) for n in lens]
    return PackedBatch.build(ids, None, torch.device("cpu"), key_lens=key_lens)


def reference(qkv: torch.Tensor, lens: list[int], key_lens: list[int] | None) -> torch.Tensor:
    """Each sequence alone, in float64: softmax(q k^T / sqrt(d)) v over its first keys."""
    out, start = [], 0
    for i, n in enumerate(lens):
        q, k, v = qkv[start:start + n].double().permute(1, 2, 0, 3).unbind(0)  # [heads, n, d]
        keys = n if key_lens is None else key_lens[i]
        scores = q @ k[:, :keys].transpose(1, 2) / math.sqrt(q.shape[-1])
        out.append((torch.softmax(scores, -1) @ v[:, :keys]).transpose(0, 1))
        start += n
    return torch.cat(out)  # [tokens, heads, d]


CASES = [  # lens, key_lens, heads, head_dim
    ([11], None, 12, 32),                       # one short text (MiniLM's heads)
    ([1], None, 2, 16),                         # a lone token
    ([16, 17, 15, 64, 65, 3], None, 3, 12),      # vector edges; a head size not of 16
    ([21, 5, 30], [19, 5, 1], 4, 64),           # key_lens (ColBERT's expansion tokens)
    ([200, 7, 300], None, 4, 80),               # long sequences: the parallel path
    ([40, 9], None, 2, 128),                    # the largest head
    ([5, 6], None, 2, 1),                       # the smallest head
]


def pytorch_float32(qkv: torch.Tensor, lens: list[int], key_lens: list[int] | None):
    """Each sequence alone through PyTorch's float32 SDPA: the error float32 is expected to
    have."""
    out, start = [], 0
    for i, n in enumerate(lens):
        q, k, v = qkv[start:start + n].permute(1, 2, 0, 3).unbind(0)
        keys = n if key_lens is None else key_lens[i]
        out.append(F.scaled_dot_product_attention(q, k[:, :keys], v[:, :keys]).transpose(0, 1))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("lens, key_lens, heads, head_dim", CASES)
def test_float32_equals_each_sequence_attended_alone(kernel, lens, key_lens, heads, head_dim):
    torch.manual_seed(sum(lens) + head_dim)
    qkv = torch.randn(sum(lens), 3, heads, head_dim) * 3  # scores of several units
    got = kernel(qkv, packed(lens, key_lens))
    assert got.shape == (sum(lens), heads, head_dim) and got.dtype == torch.float32
    exact = reference(qkv, lens, key_lens)
    ours = (got.double() - exact).abs()
    theirs = (pytorch_float32(qkv, lens, key_lens).double() - exact).abs()
    # as close as PyTorch's own float32 attention (measured: max 0.6-1.6x, mean 0.9-1.3x)
    assert ours.max() <= 2 * theirs.max() + 1e-7
    assert ours.mean() <= 1.5 * theirs.mean() + 1e-9


@pytest.mark.parametrize("lens, key_lens, heads, head_dim", CASES)
def test_bfloat16_is_the_float32_result_rounded(kernel, lens, key_lens, heads, head_dim):
    """bfloat16 in and out, float32 inside: exactly the float32 result on the same values,
    rounded to nearest even as PyTorch rounds."""
    torch.manual_seed(sum(lens) + head_dim + 1)
    qkv = (torch.randn(sum(lens), 3, heads, head_dim) * 3).bfloat16()
    batch = packed(lens, key_lens)
    got = kernel(qkv, batch)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, kernel(qkv.float(), batch).bfloat16())


def test_it_reads_and_writes_nothing_outside_the_batch(kernel):
    """Rows of qkv past the batch's tokens, and out's other rows, are left alone."""
    lens = [7, 4]
    qkv = torch.randn(12, 3, 2, 16)
    qkv[11] = float("nan")  # a row no sequence owns: reading it would spread NaN
    got = kernel(qkv, packed(lens))
    assert torch.isfinite(got[:11]).all()
    assert (got[:11].double() - reference(qkv[:11], lens, None)).abs().max() <= 1e-5


def test_a_sequence_with_no_keys_attends_to_nothing(kernel):
    qkv = torch.randn(7, 3, 2, 16)
    got = kernel(qkv, packed([3, 4], key_lens=[0, 2]))
    assert torch.equal(got[:3], torch.zeros(3, 2, 16))
    assert (got[3:].double() - reference(qkv[3:], [4], [2])).abs().max() <= 1e-5


@pytest.mark.parametrize("make, message", [
    (lambda: torch.randn(4, 3, 2, 129), "head_dim <= 128"),
    (lambda: torch.randn(4, 3, 2, 16).half(), "torch.float16"),
    (lambda: torch.randn(4, 2, 3, 16).transpose(1, 2), "contiguous"),
    (lambda: torch.randn(4, 2, 2, 16), "(4, 2, 2, 16)"),
])
def test_it_refuses_what_it_cannot_read(kernel, make, message):
    with pytest.raises(ValueError, match="native attention") as error:
        kernel(make(), packed([4]))
    assert message in str(error.value)


def test_fits():
    assert native.Attention.fits(32, torch.float32) and native.Attention.fits(128, torch.bfloat16)
    assert not native.Attention.fits(129, torch.float32)
    assert not native.Attention.fits(0, torch.float32)
    assert not native.Attention.fits(32, torch.float16)


def test_a_build_is_cached_by_its_key(tmp_path, kernel):
    built = native.build(COMPILER, tmp_path)
    assert built is not None
    (library,) = tmp_path.glob("kernels-*.so")
    stamp = library.stat().st_mtime_ns
    assert native.build(COMPILER, tmp_path) is not None
    assert [p.name for p in tmp_path.iterdir()] == [library.name]  # no temporary left
    assert library.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    qkv = torch.randn(5, 3, 2, 16)
    assert torch.equal(built.attention(qkv, packed([5])), kernel(qkv, packed([5])))


def test_no_compiler_keeps_pytorch(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="poolsvc.engine.native"):
        assert native.build(None, tmp_path) is None
        assert native.build(str(tmp_path / "no-such-c++"), tmp_path) is None
    assert "no C++ compiler" in caplog.text
    assert "keeps PyTorch's attention and oneDNN's products" in caplog.text
    assert not list(tmp_path.glob("*.so"))


def test_a_failed_build_keeps_pytorch_and_says_why(tmp_path, caplog):
    compiler = tmp_path / "broken-c++"  # a compiler that reports an error
    compiler.write_text("#!/bin/sh\necho 'attention.cpp:1: error: broken on purpose' >&2\n"
                        "exit 1\n")
    compiler.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="poolsvc.engine.native"):
        assert native.build(str(compiler), tmp_path / "cache") is None
    assert "broken on purpose" in caplog.text
    assert not list((tmp_path / "cache").glob("*.so"))


def test_a_cache_dir_it_cannot_write_keeps_pytorch(tmp_path, caplog):
    (tmp_path / "a-file").write_text("")
    with caplog.at_level(logging.WARNING, logger="poolsvc.engine.native"):
        assert native.build(COMPILER or "c++", tmp_path / "a-file" / "cache") is None
    assert "a-file" in caplog.text and "POOLSVC_CACHE_DIR" in caplog.text


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("POOLSVC_CACHE_DIR", str(tmp_path / "a"))
    assert native.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("POOLSVC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert native.cache_dir() == tmp_path / "b" / "poolsvc"
