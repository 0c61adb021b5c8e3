"""NF4 storage: code book, rounding, packing, padding, double quantisation, storage cost, and
byte equality with bitsandbytes (when it is installed)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorazoo.errors import ConfigError
from lorazoo.quant import (
    NF4Linear,
    bits_per_param,
    block_scales,
    dequantize_nf4,
    dynamic_code,
    nf4_code,
    quantize_nf4,
    requantize,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def unpack(codes: torch.Tensor, n: int) -> torch.Tensor:
    """Independent unpacking: high nibble first."""
    hi = (codes >> 4).long()
    lo = (codes & 15).long()
    return torch.stack([hi, lo], dim=1).reshape(-1)[:n]


def true_absmax(w: torch.Tensor) -> torch.Tensor:
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    return torch.stack([flat[i : i + 64].abs().max() for i in range(0, n, 64)])


# ---- code books ---------------------------------------------------------------------------------


def test_nf4_code_book_is_normal_quantiles_with_exact_zero():
    # NF4: 8 positive quantiles of N(0, 1) between 1/2 and 0.9677083, 7 negative, exact 0,
    # normalised to [-1, 1]
    off = 0.9677083
    pos = torch.special.ndtri(torch.linspace(off, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(off, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    v = v / v.abs().max()
    code = nf4_code()
    assert code.dtype == torch.float32 and code.numel() == 16
    assert torch.all(code[1:] > code[:-1])
    assert code[7].item() == 0.0 and code[0].item() == -1.0 and code[15].item() == 1.0
    assert torch.allclose(code.double(), v, atol=1e-6, rtol=0)


def test_dynamic_code_book():
    c = dynamic_code()
    assert c.numel() == 256 and c.dtype == torch.float32
    assert torch.all(c[1:] > c[:-1])  # sorted, no duplicates
    assert c[-1].item() == 1.0 and (c == 0).sum().item() == 1
    assert -1.0 < c[0].item() < -0.99
    # 7 decades per sign, the finest holding 1 value, the coarsest 64
    pos = c[c > 0]
    assert pos.numel() == 128 and pos.min().item() == pytest.approx(0.55e-6, rel=1e-5)


# ---- packing, padding, zeros --------------------------------------------------------------------


def test_packing_high_nibble_first():
    q = quantize_nf4(torch.tensor([-1.0, 1.0, 0.0, 0.5]), double_quant=False)
    # -1 -> 0, 1 -> 15, 0 -> 7, 0.5 -> 12 (0.4407 is nearer than 0.5626)
    assert q.codes.tolist() == [0x0F, 0x7C]
    assert q.absmax.tolist() == [1.0]


def test_odd_count_padded_with_zero_code():
    q = quantize_nf4(torch.tensor([0.0, -2.0, 2.0]), double_quant=False)
    assert q.codes.tolist() == [0x70, 0xF7]
    assert dequantize_nf4(q).tolist() == [0.0, -2.0, 2.0]


@pytest.mark.parametrize("shape", [(1,), (63,), (64,), (65,), (3, 7), (5, 64), (2, 3, 33), (129, 1)])
@pytest.mark.parametrize("dq", [False, True])
def test_shapes_and_sizes(shape, dq):
    w = torch.randn(shape)
    q = quantize_nf4(w, dq)
    n = math.prod(shape)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (-(-n // 2),)
    assert q.absmax.shape == (-(-n // 64),)
    assert q.absmax.dtype == (torch.uint8 if dq else torch.float32)
    if dq:
        blocks = -(-n // 64)
        assert q.absmax_scale.shape == ((blocks + 255) // 256,)
        assert q.absmax_offset.shape == ()
    out = dequantize_nf4(q)
    assert out.shape == w.shape and out.dtype == w.dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dq", [False, True])
def test_exact_zero(dtype, dq):
    torch.manual_seed(0)
    w = torch.randn(7, 100).to(dtype)
    w[torch.rand(w.shape) < 0.3] = 0
    w[2] = 0  # whole blocks of zeros too
    q = quantize_nf4(w, dq)
    out = dequantize_nf4(q)
    assert torch.all(out[w == 0] == 0)
    assert torch.all(unpack(q.codes, w.numel())[(w == 0).reshape(-1)] == 7)


def test_all_zero_tensor():
    for dq in (False, True):
        for n in (64, 70, 64 * 300):
            q = quantize_nf4(torch.zeros(n), dq)
            assert torch.all(dequantize_nf4(q) == 0)


def test_block_maximum_is_exact_without_double_quant():
    torch.manual_seed(1)
    w = torch.randn(10, 128)
    q = quantize_nf4(w, double_quant=False)
    assert torch.equal(q.absmax, true_absmax(w))
    out = dequantize_nf4(q).reshape(-1, 64)
    idx = w.reshape(-1, 64).abs().argmax(dim=1)
    rows = torch.arange(idx.numel())
    assert torch.equal(out[rows, idx], w.reshape(-1, 64)[rows, idx])


def test_codes_are_nearest_values():
    torch.manual_seed(2)
    w = torch.randn(50, 64) * torch.rand(50, 1) * 3
    q = quantize_nf4(w, double_quant=False)
    scaled = (w.reshape(-1, 64) * (1.0 / q.absmax).unsqueeze(-1)).reshape(-1)
    brute = (scaled.unsqueeze(-1) - nf4_code()).abs().argmin(dim=-1)
    assert torch.equal(unpack(q.codes, w.numel()), brute)


def test_chunking_does_not_change_the_result():
    torch.manual_seed(3)
    w = torch.randn(37, 300)
    q = quantize_nf4(w)
    ref = dequantize_nf4(q)
    for dtype in DTYPES:
        whole = dequantize_nf4(q, dtype, chunk_blocks=10_000)
        for chunk in (1, 3, 17):
            assert torch.equal(dequantize_nf4(q, dtype, chunk_blocks=chunk), whole)
    out = torch.empty(37, 300)
    assert dequantize_nf4(q, out=out) is out and torch.equal(out, ref)


def test_rejects_bad_input():
    with pytest.raises(ConfigError, match="float32, bfloat16, float16 or float64"):
        quantize_nf4(torch.ones(64, dtype=torch.int32))
    with pytest.raises(ConfigError, match="empty"):
        quantize_nf4(torch.ones(0))
    with pytest.raises(ConfigError, match="meta"):
        quantize_nf4(torch.ones(64, device="meta"))
    q = quantize_nf4(torch.ones(64))
    with pytest.raises(ConfigError, match="out must be"):
        dequantize_nf4(q, out=torch.empty(63))


# ---- rounding error -----------------------------------------------------------------------------

HALF_GAP = float((nf4_code()[1:] - nf4_code()[:-1]).max()) / 2  # 0.152: the widest rounding interval


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 90), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    dq=st.booleans(),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_round_trip_error_bound(shape, dtype, dq, scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * scale).to(dtype)
    q = quantize_nf4(w, dq)
    out = dequantize_nf4(q, torch.float32).reshape(-1)
    ref = w.float().reshape(-1)
    s_true = true_absmax(w)
    s_used = block_scales(q)
    if not dq:
        assert torch.equal(s_used, s_true)
    per_elem = torch.arange(ref.numel()) // 64
    # rounding to the nearest of 16 values, plus the error of the stored scale
    bound = HALF_GAP * s_true[per_elem] * (1 + 1e-6) + (s_used - s_true).abs()[per_elem] + 1e-30
    assert torch.all((out - ref).abs() <= bound)
    # each value is its code times its block's scale, rounded once
    vals = nf4_code()[unpack(q.codes, ref.numel())] * s_used[per_elem]
    assert torch.equal(dequantize_nf4(q, dtype).reshape(-1), vals.to(dtype))


def test_double_quant_scale_error_is_small():
    torch.manual_seed(4)
    w = torch.randn(512, 1376) * 0.02
    q = quantize_nf4(w, True)
    s_true = true_absmax(w)
    rel = ((block_scales(q) - s_true).abs() / s_true).max().item()
    assert rel < 0.02  # 8 bits for the centred scales


def test_relative_error_is_the_known_nf4_figure():
    torch.manual_seed(5)
    w = torch.randn(256, 1024)
    q, err = requantize(w, double_quant=False)
    assert 0.08 < err.relative < 0.11
    manual = ((dequantize_nf4(q) - w).double().norm() / w.double().norm()).item()
    assert err.relative == pytest.approx(manual, rel=1e-9)
    assert err.max_abs == pytest.approx((dequantize_nf4(q) - w).abs().max().item(), rel=1e-6)


def test_requantising_the_dequantised_weight_is_stable():
    torch.manual_seed(6)
    w = torch.randn(33, 200)
    q = quantize_nf4(w, double_quant=False)
    q2 = quantize_nf4(dequantize_nf4(q), double_quant=False)
    assert torch.equal(q.codes, q2.codes) and torch.equal(q.absmax, q2.absmax)


# ---- storage cost ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(512, 512), (1376, 512), (512, 1376), (4096, 64)])
def test_bits_per_param_from_the_stored_tensors(shape):
    """Counted from every tensor a layer stores (its state dict, bias excluded)."""
    lin = torch.nn.Linear(shape[1], shape[0], bias=False)
    for dq, limit in ((True, 4.13), (False, 4.5 + 1e-9)):
        layer = NF4Linear.from_linear(lin, double_quant=dq)
        sd = layer.state_dict()
        stored = sum(t.numel() * t.element_size() for t in sd.values())
        bits = 8 * stored / lin.weight.numel()
        assert bits <= limit
        assert bits == pytest.approx(bits_per_param(lin.weight.numel(), dq))
        assert bits == pytest.approx(layer.nf4().bits_per_param())
    assert bits_per_param(4096 * 11008, True) == pytest.approx(4.127, abs=5e-4)
    assert bits_per_param(4096 * 11008, False) == 4.5


# ---- bitsandbytes -------------------------------------------------------------------------------


def _bnb():
    return pytest.importorskip("bitsandbytes.functional")


def _bnb_equal(w: torch.Tensor, dq: bool) -> None:
    F = _bnb()
    packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=dq)
    q = quantize_nf4(w, dq)
    assert torch.equal(packed.reshape(-1), q.codes)
    assert torch.equal(state.absmax, q.absmax)
    if dq:
        assert torch.equal(state.state2.absmax, q.absmax_scale)
        assert torch.equal(state.offset.reshape(()), q.absmax_offset)
    ref = F.dequantize_4bit(packed, state, quant_type="nf4")
    assert torch.equal(ref.reshape(-1), dequantize_nf4(q).reshape(-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("shape", [(64, 64), (300, 70), (7, 13), (1, 1), (33,), (257 * 64 + 5,), (512, 1376)])
def test_bytes_equal_bitsandbytes(shape, dtype, dq):
    torch.manual_seed(7)
    _bnb_equal((torch.randn(shape) * 0.05).to(dtype), dq)


@pytest.mark.parametrize("kind", ["zeros", "sparse", "laplace", "outliers", "constant"])
def test_bytes_equal_bitsandbytes_on_awkward_weights(kind):
    torch.manual_seed(8)
    n = 64 * 700 + 31
    w = torch.randn(n)
    if kind == "zeros":
        w = torch.zeros(n)
    elif kind == "sparse":
        w[torch.rand(n) < 0.9] = 0
    elif kind == "laplace":
        w = torch.distributions.Laplace(0.0, 0.02).sample((n,))
    elif kind == "outliers":
        w[torch.randint(0, n, (20,))] *= 100
    elif kind == "constant":
        w = torch.full((n,), 0.25)
    for dq in (False, True):
        _bnb_equal(w, dq)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 700), min_size=1, max_size=2),
    dtype=st.sampled_from(DTYPES),
    dq=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bytes_equal_bitsandbytes_property(shape, dtype, dq, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * torch.rand(shape, generator=g) ** 2).to(dtype)
    _bnb_equal(w, dq)
