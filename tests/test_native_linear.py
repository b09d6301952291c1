"""engine/linear.cpp through native.Linear: post(x W^T + bias) equals the float64 computation as
closely as PyTorch's float32 does, bfloat16 is that result rounded, for every post, row count
(register blocks, row chunks), odd sizes and threads; what it refuses; and a build without
AVX-512 leaves the products to oneDNN. (Whole models through it: test_cpu.py,
test_models_families.py.)"""

from __future__ import annotations

import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

from poolsvc.engine import cpu, native

COMPILER = shutil.which("c++") or shutil.which("g++")


@pytest.fixture(scope="module")
def linear(native_kernels):
    if not native_kernels.linear.fits(torch.float32):
        pytest.skip("linear.cpp needs AVX-512, which this CPU lacks")
    return native_kernels.linear


POSTS = [None, "gelu", "gelu_tanh", "add", "mul"]
SHAPES = [  # rows, in_features, out_features
    (11, 384, 96),    # one short text, whole panels
    (1, 7, 5),        # a lone row; a partial panel, odd in_features
    (13, 33, 70),     # a register block and one more row; two panels and a part
    (150, 1024, 64),  # K by many blocks of 128
    (300, 8192, 40),  # several row chunks (4 MiB of x each)
]


def exact(x, w, bias, post, other):
    """The float64 result; `x`, `w`, `other` as they are (bfloat16 values exactly)."""
    y = x.double() @ w.double().T
    if bias is not None:
        y = y + bias.double()
    if post == "gelu":
        y = F.gelu(y)
    elif post == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    elif post == "add":
        y = y + other.double()
    elif post == "mul":
        y = y * other.double()
    return y


def pytorch_float32(x, w, bias, post, other):
    y = F.linear(x, w, bias)
    if post == "gelu":
        return F.gelu(y)
    if post == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    return y + other if post == "add" else y * other if post == "mul" else y


def inputs(rows, k, n, post, dtype, seed):
    torch.manual_seed(seed)
    x = torch.randn(rows, k).to(dtype)
    w = (torch.randn(n, k) / k ** 0.5).to(dtype)
    bias = torch.randn(n) if seed % 2 else None  # float32: what the kernel adds
    other = torch.randn(rows, n).to(dtype) if post in ("add", "mul") else None
    return x, w, bias, other


@pytest.mark.parametrize("post", POSTS)
@pytest.mark.parametrize("rows, k, n", SHAPES)
def test_float32_is_as_close_as_pytorchs(linear, rows, k, n, post):
    x, w, bias, other = inputs(rows, k, n, post, torch.float32, rows + k + n)
    got = linear.product(w, bias, post)(x, other)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    want = exact(x, w, bias, post, other)
    ours = (got.double() - want).abs().max()
    theirs = (pytorch_float32(x, w, bias, post, other).double() - want).abs().max()
    assert ours <= 2 * theirs + 1e-6


@pytest.mark.parametrize("post", POSTS)
@pytest.mark.parametrize("rows, k, n", SHAPES)
def test_bfloat16_is_the_result_rounded(linear, rows, k, n, post):
    """bfloat16 in and out, float32 inside: within half a bfloat16 step (2^-8 of the value) of
    the exact result, plus float32's sums."""
    x, w, bias, other = inputs(rows, k, n, post, torch.bfloat16, rows + k + n + 1)
    got = linear.product(w, bias, post)(x, other)
    assert got.dtype == torch.bfloat16
    want = exact(x, w, bias, post, other)
    assert ((got.double() - want).abs() <= want.abs() * 2.0 ** -8 + 1e-5).all()


def test_threads_do_not_change_a_bit(linear):
    x, w, bias, _ = inputs(40, 96, 200, "gelu", torch.float32, 3)
    product = linear.product(w, bias, "gelu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = product(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, product(x))


def test_any_leading_shape_and_no_rows(linear):
    x, w, bias, other = inputs(12, 16, 40, "add", torch.float32, 5)
    product = linear.product(w, bias, "add")
    flat = product(x, other)
    got = product(x.view(3, 4, 16), other.view(3, 4, 40))
    assert torch.equal(got, flat.view(3, 4, 40))
    assert product(x[:0], other[:0]).shape == (0, 40)
    # views with strides are read as their values
    assert torch.equal(product(x.t().contiguous().t(), other.t().contiguous().t()), flat)


@pytest.mark.parametrize("call, message", [
    (lambda lin, w, x: lin.product(w)(x[:, :15]), "takes [..., 16] torch.float32"),
    (lambda lin, w, x: lin.product(w)(x.bfloat16()), "not torch.bfloat16"),
    (lambda lin, w, x: lin.product(w)(x[0, 0]), "not torch.float32 ()"),
    (lambda lin, w, x: lin.product(w, post="add")(x), "pass `other` exactly"),
    (lambda lin, w, x: lin.product(w)(x, torch.zeros(4, 8)), "pass `other` exactly"),
    (lambda lin, w, x: lin.product(w, post="add")(x, torch.zeros(4, 7)), "`other` must be"),
    (lambda lin, w, x: lin.product(w, post="mul")(x, torch.zeros(4, 8).bfloat16()),
     "`other` must be torch.float32"),
    (lambda lin, w, x: lin.product(w, post="relu"), "post 'relu' is not one of"),
    (lambda lin, w, x: lin.product(w, torch.zeros(7)), "bias must be [8], not (7,)"),
    (lambda lin, w, x: lin.product(w.half()), "not torch.float16"),
    (lambda lin, w, x: lin.product(w[0]), "2-D CPU weight"),
])
def test_it_refuses_what_it_cannot_compute(linear, call, message):
    with pytest.raises(ValueError) as error:
        call(linear, torch.randn(8, 16), torch.randn(4, 16))
    assert message in str(error.value)


def test_packed_linear_runs_the_kernel_or_onednn(linear):
    """The same layer either way, up to float32 rounding; blocks unpadded for the kernel, and
    nothing for cpu.warm to build."""
    torch.manual_seed(7)
    layer = torch.nn.Linear(48, 80)
    x, other = torch.randn(70, 48), torch.randn(70, 80)
    onednn = cpu.PackedLinear.of(layer, binary="add")
    ours = cpu.PackedLinear.of(layer, binary="add", linear=linear)
    assert onednn.native is None and ours.native is not None
    assert onednn.pads and not ours.pads
    assert "by linear.cpp" in repr(ours) and "by oneDNN" in repr(onednn)
    assert (ours(x, other) - onednn(x, other)).abs().max() <= 1e-5
    assert cpu.warm(torch.nn.Sequential(ours)) == 0
    seen = []
    cpu.by_blocks(lambda t: seen.append(t.shape[0]) or t, x, pad=False)
    cpu.by_blocks(lambda t: seen.append(t.shape[0]) or t, x)
    assert seen == [70, 80]  # oneDNN's blocks of more than EXACT_ROWS rows go by 16


def test_without_avx512_the_products_stay_on_onednn(monkeypatch, tmp_path, linear):
    """A build for a CPU without AVX-512 still holds the attention; its Linear fits nothing,
    so layers pack for oneDNN."""
    if platform.machine() != "x86_64":
        pytest.skip("an x86-64 build flag")
    flags = tuple("-march=x86-64-v2" if f == "-march=native" else f for f in native.FLAGS)
    monkeypatch.setattr(native, "FLAGS", flags)
    built = native.build(COMPILER, tmp_path)
    assert built is not None
    assert not built.linear.fits(torch.float32) and not built.linear.fits(torch.bfloat16)
    assert cpu.PackedLinear.of(torch.nn.Linear(16, 32), linear=built.linear).native is None
    qkv = torch.randn(5, 3, 2, 16)
    batch = native.PackedBatch.build([[1, 2, 3, 4, 5]], None, torch.device("cpu"))
    want = native.load().attention(qkv, batch)
    assert (built.attention(qkv, batch) - want).abs().max() <= 1e-5
