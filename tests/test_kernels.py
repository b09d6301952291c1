"""Triton kernels against their PyTorch references: on the CPU through Triton's interpreter, or,
with TRITON_INTERPRET=0 on a GPU machine, compiled on CUDA.

Outputs are poisoned with NaN first, so an element a kernel fails to write fails the comparison.
"""

from __future__ import annotations

import os

# Triton decides interpreted or compiled when `@triton.jit` decorates a function (3.9 reads this
# through triton.knobs at that moment), and its own tl.sum / tl.max are decorated when triton is
# first imported: so this is set before anything imports triton (it then stays set for the
# session; processes started later inherit it). An explicit TRITON_INTERPRET=0 keeps compiled
# kernels, tested on CUDA.
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402  (a test dependency: missing, the tests fail, they do not skip)

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "poolsvc_kernels"


def _load_from_source() -> ModuleType:
    """kernels/ as poolsvc_kernels, for a checkout where the package is not installed."""
    spec = importlib.util.spec_from_file_location(
        PACKAGE, ROOT / "kernels" / "__init__.py",
        submodule_search_locations=[str(ROOT / "kernels")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module


def _import_kernels() -> ModuleType:
    if PACKAGE in sys.modules or importlib.util.find_spec(PACKAGE) is not None:
        return importlib.import_module(PACKAGE)
    return _load_from_source()


kernels = _import_kernels()


def _device() -> tuple[str | None, str]:
    """Where the kernels run: the CPU under the interpreter, else CUDA; None and why when they
    cannot run here."""
    interpreted = kernels.interpreted(kernels.pooling._pool_kernel)
    if interpreted and kernels.interpreted(triton.language.sum):
        return "cpu", ""
    if not interpreted and not kernels.interpreted(triton.language.sum):
        if torch.cuda.is_available():
            return "cuda", ""
        return None, ("the kernels are compiled (triton was imported before this module set "
                      "TRITON_INTERPRET=1, or it is 0) and there is no GPU: run this file on its "
                      "own, or import triton lazily elsewhere")
    return None, ("triton was imported before TRITON_INTERPRET=1 was set, poolsvc_kernels after: "
                  "interpreted kernels cannot call compiled tl.sum; run this file on its own")


DEVICE, WHY_NOT = _device()


@pytest.fixture
def device() -> str:
    if DEVICE is None:
        pytest.fail(WHY_NOT)
    return DEVICE


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Triton's interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest even), and
# add_rms_norm rounds three times (the sum, the normalized row, the product with the weight),
# so bfloat16 allows three ulps: 3 * 2**-7.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=2.4e-2, atol=1e-2),
}


@pytest.fixture
def gen(request) -> torch.Generator:
    """Fresh random inputs per test, reproducible per parametrization."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, device: str,
          scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale + shift).to(dtype).to(device)


def poisoned(*shape: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.cpu()


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.cpu(), expected.cpu(), **TOLERANCES[expected.dtype])


def test_kernels_run_where_the_tests_expect(device):
    assert kernels.AVAILABLE
    found = 0
    for op in ("pooling", "add_norm", "bias_gelu", "rotary"):
        module = importlib.import_module(f"{PACKAGE}.{op}")
        for name, kernel in vars(module).items():
            if name.endswith("_kernel"):
                found += 1
                assert kernels.interpreted(kernel) == (device == "cpu"), name
    assert found == 6


# --- pooling ---------------------------------------------------------------------------------

# empty sequences first, inside and last; a single token; sequences longer than a 16-row tile
SEQ_LENS = [0, 1, 7, 23, 0, 2, 0]
HIDDEN = 133  # odd, and over one 128-column block


def cu_seqlens_of(lens: list[int], device: str) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["CLS", "LAST", "MEAN"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dimensions", [HIDDEN, 70])
@pytest.mark.parametrize("out_dtype", [torch.float32, "input"])
def test_pool(device, gen, dtype, method, normalize, dimensions, out_dtype):
    out_dtype = dtype if out_dtype == "input" else out_dtype
    num_tokens = sum(SEQ_LENS)
    # rows strided, as in a slice of a wider buffer
    hidden_states = randn(gen, num_tokens, HIDDEN + 5, dtype=dtype, device=device)[:, :HIDDEN]
    cu_seqlens = cu_seqlens_of(SEQ_LENS, device)
    out = poisoned(len(SEQ_LENS), dimensions, dtype=out_dtype, device=device)
    method = kernels.PoolMethod[method]
    result = kernels.pool(hidden_states, cu_seqlens, method, dimensions, normalize, out=out)
    assert result is out
    expected = kernels.pool_reference(hidden_states.cpu(), cu_seqlens.cpu(), method, dimensions,
                                      normalize, out_dtype)
    assert_close(out, expected)
    empty = [i for i, n in enumerate(SEQ_LENS) if n == 0]
    assert not out[empty].any()


@pytest.mark.parametrize("method", ["CLS", "LAST", "MEAN"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_pool_only_the_indexed_sequences(device, gen, method, index_dtype):
    """seq_index pools a subset of the batch, in its order (the engine pools only the sequences
    that share a request's options)."""
    hidden_states = randn(gen, sum(SEQ_LENS), HIDDEN, dtype=torch.float16, device=device)
    cu_seqlens = cu_seqlens_of(SEQ_LENS, device)
    seq_index = torch.tensor([3, 1, 5, 4], dtype=index_dtype, device=device)
    method = kernels.PoolMethod[method]
    result = kernels.pool(hidden_states, cu_seqlens, method, 70, True, torch.float16,
                          seq_index=seq_index)
    assert result.shape == (4, 70)
    everything = kernels.pool_reference(hidden_states.cpu(), cu_seqlens.cpu(), method, 70, True,
                                        torch.float16)
    assert_close(result, everything[seq_index.cpu().long()])
    assert_close(result, kernels.pool_reference(hidden_states.cpu(), cu_seqlens.cpu(), method,
                                                70, True, torch.float16, seq_index.cpu()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_normalizes_wide_rows(device, gen, dtype):
    """Rows wider than one normalization block (1024), truncated (Matryoshka) first."""
    lens = [3, 1, 4]
    hidden_states = randn(gen, sum(lens), 2100, dtype=dtype, device=device)
    cu_seqlens = cu_seqlens_of(lens, device)
    out = poisoned(3, 2050, dtype=dtype, device=device)
    mean = kernels.PoolMethod.MEAN
    kernels.pool(hidden_states, cu_seqlens, mean, 2050, True, out=out)
    expected = kernels.pool_reference(hidden_states.cpu(), cu_seqlens.cpu(), mean, 2050, True,
                                      dtype)
    assert_close(out, expected)
    torch.testing.assert_close(out.float().norm(dim=-1).cpu(), torch.ones(3), rtol=2e-2,
                               atol=2e-2)


def test_pool_accepts_the_engine_pooling_type(device, gen):
    from poolsvc.engine.params import PoolingType

    hidden_states = randn(gen, 5, 16, dtype=torch.float16, device=device)
    cu_seqlens = cu_seqlens_of([2, 3], device)
    result = kernels.pool(hidden_states, cu_seqlens, PoolingType.MEAN)  # allocates float32 rows
    assert result.dtype == torch.float32 and result.shape == (2, 16)
    assert_close(result, kernels.pool_reference(hidden_states.cpu(), cu_seqlens.cpu(),
                                                kernels.PoolMethod.MEAN))
    with pytest.raises(ValueError, match="MAX.*has no kernel; supported: CLS, LAST, MEAN"):
        kernels.pool(hidden_states, cu_seqlens, PoolingType.MAX)


@pytest.mark.parametrize("lens", [[], [0, 0]], ids=["no-sequences", "all-empty"])
def test_pool_without_tokens(device, lens):
    hidden_states = torch.empty(0, 8, device=device)
    out = poisoned(len(lens), 8, dtype=torch.float32, device=device)
    kernels.pool(hidden_states, cu_seqlens_of(lens, device), kernels.PoolMethod.MEAN,
                 normalize=True, out=out)
    assert torch.equal(out.cpu(), torch.zeros(len(lens), 8))


# --- residual add + norm ---------------------------------------------------------------------

NUM_TOKENS = 6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [37, 384, 4096])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_layer_norm(device, gen, dtype, hidden, with_residual):
    x = randn(gen, NUM_TOKENS, hidden, dtype=dtype, device=device, scale=2.0, shift=0.5)
    residual = randn(gen, NUM_TOKENS, hidden, dtype=dtype, device=device) if with_residual \
        else None
    weight = randn(gen, hidden, dtype=dtype, device=device, scale=0.1, shift=1.0)
    bias = randn(gen, hidden, dtype=dtype, device=device, scale=0.1)
    out = poisoned(NUM_TOKENS, hidden, dtype=dtype, device=device)
    assert kernels.add_layer_norm(x, residual, weight, bias, 1e-12, out=out) is out
    expected = kernels.add_layer_norm_reference(x.cpu(), cpu(residual), weight.cpu(), bias.cpu(),
                                                1e-12)
    assert_close(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [37, 384, 4096])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm(device, gen, dtype, hidden, with_residual):
    x = randn(gen, NUM_TOKENS, hidden, dtype=dtype, device=device, scale=2.0)
    residual = randn(gen, NUM_TOKENS, hidden, dtype=dtype, device=device) if with_residual \
        else None
    weight = randn(gen, hidden, dtype=dtype, device=device, scale=0.1, shift=1.0)
    out = poisoned(NUM_TOKENS, hidden, dtype=dtype, device=device)
    residual_out = poisoned(NUM_TOKENS, hidden, dtype=dtype, device=device) if with_residual \
        else None
    y, h = kernels.add_rms_norm(x, residual, weight, 1e-6, out=out, residual_out=residual_out)
    assert y is out and h is (residual_out if with_residual else x)
    expected_y, expected_h = kernels.add_rms_norm_reference(x.cpu(), cpu(residual), weight.cpu(),
                                                            1e-6)
    assert_close(y, expected_y)
    assert_close(h, expected_h)


def test_add_rms_norm_updates_the_residual_in_place(device, gen):
    x, residual = (randn(gen, NUM_TOKENS, 64, dtype=torch.bfloat16, device=device)
                   for _ in range(2))
    weight = randn(gen, 64, dtype=torch.bfloat16, device=device, shift=1.0)
    expected_y, expected_h = kernels.add_rms_norm_reference(x.cpu(), residual.cpu(),
                                                            weight.cpu(), 1e-6)
    y, h = kernels.add_rms_norm(x, residual, weight, 1e-6, residual_out=residual)
    assert h is residual
    assert_close(residual, expected_h)
    assert_close(y, expected_y)


def test_references_match_the_engine_norms(gen):
    from poolsvc.engine.models.llama import RMSNorm

    x = randn(gen, NUM_TOKENS, 48, dtype=torch.bfloat16, device="cpu")
    norm = RMSNorm(48, 1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(randn(gen, 48, dtype=torch.bfloat16, device="cpu", shift=1.0))
        y, h = kernels.add_rms_norm_reference(x, None, norm.weight, 1e-6)
        assert torch.equal(y, norm(x)) and h is x
        layer_norm = torch.nn.LayerNorm(48, eps=1e-12)
        expected = layer_norm(x.float() + x.float())
        y = kernels.add_layer_norm_reference(x.float(), x.float(), layer_norm.weight,
                                             layer_norm.bias, 1e-12)
    torch.testing.assert_close(y, expected)


# --- bias + GELU ---------------------------------------------------------------------------


# the interpreter's numpy warns when the tanh form's exp(-2u) overflows for x << 0; the kernel
# then divides by inf and returns -0, as the GPU does and as torch does
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(7, 37), (2, 3, 1100)], ids=["2d", "3d-wide"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu(device, gen, dtype, approximate, shape, with_bias):
    x = randn(gen, *shape, dtype=dtype, device=device, scale=3.0)
    x.view(-1)[:4] = torch.tensor([-30.0, -9.0, 9.0, 30.0])  # both tails of the tanh form
    bias = randn(gen, shape[-1], dtype=dtype, device=device) if with_bias else None
    out = poisoned(*shape, dtype=dtype, device=device)
    assert kernels.bias_gelu(x, bias, approximate, out=out) is out
    expected = kernels.bias_gelu_reference(x.cpu(), cpu(bias), approximate)
    assert_close(out, expected)


# --- rotary ----------------------------------------------------------------------------------

MAX_POSITIONS = 64


def tables(head_dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return tuple(t.to(device) for t in kernels.rotary_tables(inv_freq, MAX_POSITIONS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim",
                         [(4, 2, 64), (3, 3, 128), (6, 1, 128), (5, 1, 80)])
def test_rotary(device, gen, dtype, heads, kv_heads, head_dim):
    """q and k are views of a fused qkv projection; v must come out untouched."""
    num_tokens = 9
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    qkv = randn(gen, num_tokens, q_dim + 2 * kv_dim, dtype=dtype, device=device)
    original = qkv.clone()
    q = qkv[:, :q_dim].view(num_tokens, heads, head_dim)
    key = qkv[:, q_dim:q_dim + kv_dim].view(num_tokens, kv_heads, head_dim)
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen).to(device)
    cos, sin = tables(head_dim, device)
    expected_q, expected_k = kernels.rotary_reference(q.cpu(), key.cpu(), positions.cpu(),
                                                      cos.cpu(), sin.cpu())
    result = kernels.apply_rotary_(q, key, positions, cos, sin)
    assert result[0] is q and result[1] is key
    assert_close(q, expected_q)
    assert_close(key, expected_k)
    assert torch.equal(qkv[:, q_dim + kv_dim:], original[:, q_dim + kv_dim:])


def test_rotary_reference_matches_the_engine(gen):
    from poolsvc.engine.models.llama import RopeConfig, RotaryEmbedding, apply_rotary

    head_dim, num_tokens = 64, 11
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4])  # three packed sequences
    cos, sin = tables(head_dim, "cpu")
    engine_cos, engine_sin = RotaryEmbedding(RopeConfig(10000.0), head_dim)(positions,
                                                                           torch.float32)
    q = randn(gen, num_tokens, 4, head_dim, dtype=torch.float32, device="cpu")
    key = randn(gen, num_tokens, 2, head_dim, dtype=torch.float32, device="cpu")
    expected_q, expected_k = kernels.rotary_reference(q, key, positions, cos, sin)
    torch.testing.assert_close(expected_q, apply_rotary(q, engine_cos, engine_sin))
    torch.testing.assert_close(expected_k, apply_rotary(key, engine_cos, engine_sin))


# --- wrapper checks ------------------------------------------------------------------------


def test_pool_rejects_bad_arguments(gen):
    hidden_states = randn(gen, 5, 16, dtype=torch.float32, device="cpu")
    cu_seqlens = cu_seqlens_of([2, 3], "cpu")
    mean = kernels.PoolMethod.MEAN
    cases = [
        (dict(hidden_states=hidden_states.double()), "hidden_states must be torch.float32 or"),
        (dict(hidden_states=randn(gen, 16, 5, dtype=torch.float32, device="cpu").t()),
         "hidden_states must be contiguous along its last dimension"),
        (dict(hidden_states=hidden_states[None]), r"hidden_states must have shape \[\*, \*\]"),
        (dict(cu_seqlens=cu_seqlens.long()), "cu_seqlens must be torch.int32"),
        (dict(cu_seqlens=cu_seqlens[:0]), "cu_seqlens must hold num_seqs \\+ 1 offsets"),
        (dict(dimensions=17), r"dimensions must be in \[1, 16\]"),
        (dict(dimensions=0), r"dimensions must be in \[1, 16\]"),
        (dict(out=torch.empty(3, 16)), r"out must have shape \[2, 16\], got \[3, 16\]"),
        (dict(out=torch.empty(2, 16), out_dtype=torch.float16), "does not match out's dtype"),
        (dict(out_dtype=torch.int8), "out_dtype must be one of"),
        (dict(method="MAX"), "'MAX' has no kernel"),
        (dict(hidden_states=hidden_states.to("meta")), "tensors must be on one device"),
        (dict(hidden_states=hidden_states.to("meta"), cu_seqlens=cu_seqlens.to("meta")),
         "tensors are on meta, but"),
    ]
    for change, message in cases:
        args = dict(hidden_states=hidden_states, cu_seqlens=cu_seqlens, method=mean) | change
        with pytest.raises(ValueError, match=message):
            kernels.pool(**args)


def test_add_norm_rejects_bad_arguments(gen):
    x = randn(gen, 4, 32, dtype=torch.float16, device="cpu")
    weight = torch.ones(32, dtype=torch.float16)
    bias = torch.zeros(32, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"residual must have shape \[4, 32\], got \[4, 31\]"):
        kernels.add_layer_norm(x, x[:, :31], weight, bias, 1e-5)
    with pytest.raises(ValueError, match="residual must be torch.float16, got torch.float32"):
        kernels.add_rms_norm(x, x.float(), weight, 1e-6)
    with pytest.raises(ValueError, match="weight must be torch.float16, got torch.float32"):
        kernels.add_rms_norm(x, None, weight.float(), 1e-6)
    with pytest.raises(ValueError, match=r"bias must have shape \[32\]"):
        kernels.add_layer_norm(x, None, weight, bias[:16], 1e-5)
    with pytest.raises(ValueError, match="x must be torch.float32 or torch.float16 or"):
        kernels.add_layer_norm(x.long(), None, weight, bias, 1e-5)
    with pytest.raises(ValueError, match="x must be contiguous along its last dimension"):
        kernels.add_rms_norm(torch.empty(32, 4, dtype=torch.float16).t(), None, weight, 1e-6)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        kernels.add_rms_norm(x, None, torch.ones(64, dtype=torch.float16)[::2], 1e-6)
    with pytest.raises(ValueError, match=r"out must have shape \[4, 32\]"):
        kernels.add_layer_norm(x, None, weight, bias, 1e-5, out=torch.empty_like(x)[:2])
    with pytest.raises(ValueError, match="residual_out is only written when there is a residual"):
        kernels.add_rms_norm(x, None, weight, 1e-6, residual_out=torch.empty_like(x))


def test_bias_gelu_rejects_bad_arguments(gen):
    x = randn(gen, 4, 32, dtype=torch.bfloat16, device="cpu")
    bias = torch.zeros(32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"bias must have shape \[32\], got \[31\]"):
        kernels.bias_gelu(x, bias[:31])
    with pytest.raises(ValueError, match="bias must be torch.bfloat16, got torch.float32"):
        kernels.bias_gelu(x, bias.float())
    with pytest.raises(ValueError, match="x must be contiguous"):
        kernels.bias_gelu(x[:, ::2], bias[:16])
    with pytest.raises(ValueError, match="approximate must be one of \\('none', 'tanh'\\)"):
        kernels.bias_gelu(x, bias, "fast")
    with pytest.raises(ValueError, match=r"out must have shape \[4, 32\]"):
        kernels.bias_gelu(x, bias, out=torch.empty(4, 33, dtype=torch.bfloat16))


def test_rotary_rejects_bad_arguments(gen):
    q = randn(gen, 3, 4, 64, dtype=torch.float16, device="cpu")
    key = randn(gen, 3, 2, 64, dtype=torch.float16, device="cpu")
    positions = torch.arange(3)
    cos, sin = tables(64, "cpu")
    with pytest.raises(ValueError, match="head_dim must be even, got 63"):
        kernels.apply_rotary_(q[..., :63], key[..., :63], positions, cos, sin)
    with pytest.raises(ValueError, match=r"k must have shape \[3, \*, 64\], got \[2, 2, 64\]"):
        kernels.apply_rotary_(q, key[:2], positions, cos, sin)
    with pytest.raises(ValueError, match="k must be torch.float16, got torch.float32"):
        kernels.apply_rotary_(q, key.float(), positions, cos, sin)
    with pytest.raises(ValueError, match="positions must be torch.int64, got torch.int32"):
        kernels.apply_rotary_(q, key, positions.int(), cos, sin)
    with pytest.raises(ValueError, match=r"cos must have shape \[\*, 32\], got \[64, 16\]"):
        kernels.apply_rotary_(q, key, positions, cos[:, :16], sin)
    with pytest.raises(ValueError, match="sin must be torch.float32"):
        kernels.apply_rotary_(q, key, positions, cos, sin.half())
    with pytest.raises(ValueError, match="q must be contiguous along its last dimension"):
        kernels.apply_rotary_(q.transpose(1, 2).contiguous().transpose(1, 2), key, positions, cos,
                        sin)


def test_without_triton_the_references_still_work(gen):
    """A second copy of the package, imported as if triton were not installed."""
    saved = {name: sys.modules.pop(name) for name in list(sys.modules)
             if name == PACKAGE or name.startswith(PACKAGE + ".")}
    saved_triton = sys.modules["triton"]
    sys.modules["triton"] = None  # `import triton` raises ImportError
    try:
        bare = _import_kernels()
    finally:
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]
        sys.modules.update(saved)
        sys.modules["triton"] = saved_triton
    assert not bare.AVAILABLE and bare is not kernels
    x = randn(gen, 3, 8, dtype=torch.float32, device="cpu")
    bias = randn(gen, 8, dtype=torch.float32, device="cpu")
    torch.testing.assert_close(bare.bias_gelu_reference(x, bias),
                               torch.nn.functional.gelu(x + bias))
    with pytest.raises(RuntimeError, match="triton is not installed"):
        bare.bias_gelu(x, bias)
