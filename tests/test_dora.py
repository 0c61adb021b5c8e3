"""DoRA's own invariants (docs/spec/variants.md §6), beyond the conformance suite every variant passes.

Tolerances follow §11: a norm of a row is compared within ``C·(ρ·u + γ_K(u))·M_i`` with
``M_i = ‖ |W_i| + |s|·|B_i|·|A| ‖`` (the magnitudes entering it), outputs within
``lorazoo.testing.merge_tolerance``.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from lorazoo_plugins import dora as D
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lorazoo
from lorazoo.engine.inject import hosts, iter_adapters
from lorazoo.testing import merge_tolerance, perturb, unit_roundoff
from lorazoo.testing.tolerance import RHO, SAFETY

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}
    return t.detach().contiguous().view(ints[t.element_size()])


def norm_tolerance(w, A, B, scale, u: float) -> torch.Tensor:
    """§11-style bound for a computed row norm of ``W + s·B·A``."""
    m = (w.double().abs() + abs(scale) * (B.double().abs() @ A.double().abs())).norm(dim=1)
    k = w.shape[1] + A.shape[0] + 1
    return SAFETY * (RHO * u + k * u / (1 - k * u)) * m


def dense_norm(w, A, B, scale) -> torch.Tensor:
    return (w.double() + scale * (B.double() @ A.double())).norm(dim=1)


def layer_model(d_in: int, d_out: int, dtype: torch.dtype, bias: bool = True, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out, bias=bias, dtype=dtype))


def dora_of(model: nn.Module) -> D.DoRA:
    return next(iter_adapters(model))[2]


def k_near_one(model: nn.Module, spread: float = 0.1, seed: int = 0) -> None:
    """Set every magnitude to its row norm times ``1 ± spread`` (``perturb`` moves ``m`` by about
    half its size, which puts some ``k`` outside the range the output path recovers from)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, host in hosts(model):
            for a in host.adapters.values():
                n = a._detached_norm(host.weight)
                noise = torch.rand(n.shape, generator=g, dtype=torch.float64) * 2 - 1
                a.lora_magnitude_vector.copy_(n * (1 + spread * noise).to(n.dtype))


@pytest.fixture(params=["identity", "dense"])
def method(request, monkeypatch):
    """Run a test with each norm method (the shape decides which one the forward uses)."""
    monkeypatch.setattr(D, "DENSE_MAX_NUMEL", 0 if request.param == "identity" else 1 << 40)
    return request.param


# ---- configuration --------------------------------------------------------------------------


def test_config_scale_and_validation():
    m = layer_model(12, 10, torch.float32)
    lorazoo.inject(m, "dora", targets=[nn.Linear], r=4, alpha=8, rslora=True)
    assert dora_of(m).scale == 8 / math.sqrt(4)
    m2 = layer_model(12, 10, torch.float32)
    lorazoo.inject(m2, "dora", targets=[nn.Linear], r=4, alpha=8)
    assert dora_of(m2).scale == 2.0
    with pytest.raises(lorazoo.ConfigError, match="detach_norm must be True or False"):
        lorazoo.inject(layer_model(12, 10, torch.float32), "dora", targets=[nn.Linear], detach_norm=1)
    with pytest.raises(lorazoo.ConfigError, match="rslora"):
        lorazoo.inject(layer_model(12, 10, torch.float32), "dora", targets=[nn.Linear], rslora="yes")


def test_trainable_count():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 6))
    lorazoo.inject(m, "dora", targets=[nn.Linear], r=4)
    expected = 4 * (20 + 30) + 30 + 4 * (30 + 6) + 6
    assert lorazoo.trainable(m).trainable == expected
    for _, _, a in iter_adapters(m):
        assert a.lora_magnitude_vector.shape == (a.d_out,)
        assert a.lora_magnitude_vector.requires_grad


# ---- initialisation ------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    d_in=st.integers(1, 96),
    d_out=st.integers(1, 96),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_magnitude_is_row_norm(d_in, d_out, dtype, seed):
    m = layer_model(d_in, d_out, dtype, seed=seed)
    w = m[0].weight.detach().clone()
    lorazoo.inject(m, "dora", targets=[nn.Linear], r=1)
    mag = dora_of(m).lora_magnitude_vector
    assert mag.shape == (d_out,)
    ref = torch.linalg.norm(w.double(), dim=1)
    tau = norm_tolerance(w, torch.zeros(1, d_in), torch.zeros(d_out, 1), 0.0, unit_roundoff(mag.dtype))
    assert bool(((mag.double() - ref).abs() <= tau).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 5), (384, 352)])
def test_init_identity_bitwise(dtype, shape, method):
    d_in, d_out = shape
    m = layer_model(d_in, d_out, dtype)
    x = torch.randn(2, 9, d_in).to(dtype)
    m.eval()
    with torch.no_grad():
        base = m(x)
    lorazoo.inject(m, "dora", targets=[nn.Linear], r=4, alpha=16)
    a = dora_of(m)
    host = next(iter(hosts(m)))[1]
    n = a._detached_norm(host.weight)
    assert torch.equal(_bits(a.lora_magnitude_vector), _bits(n.to(a.lora_magnitude_vector.dtype)))
    for mode in ("eval", "train"):
        getattr(m, mode)()
        with torch.no_grad():
            out = m(x)
        assert torch.equal(_bits(out), _bits(base)), f"{mode}: output differs from the base at init"
    m.train()
    out = m(x)  # the autograd path
    assert torch.equal(_bits(out.detach()), _bits(base))


# ---- the norm ------------------------------------------------------------------------------


@st.composite
def norm_cases(draw):
    d_in, d_out = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    r = draw(st.integers(1, min(16, d_in, d_out)))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([0.25, 1.0, 2.0, 8.0]))
    cancel = draw(st.floats(0.0, 1.0))  # share of rows where s·B·A ≈ −W
    return d_in, d_out, r, dtype, scale, cancel, draw(st.integers(0, 2**16))


def _norm_inputs(d_in, d_out, r, dtype, scale, cancel, seed):
    g = torch.Generator().manual_seed(seed)
    acc = D.acc_dtype(dtype)
    A = torch.randn(r, d_in, generator=g, dtype=acc)
    B = torch.randn(d_out, r, generator=g, dtype=acc)
    w = torch.randn(d_out, d_in, generator=g, dtype=acc)
    rows = torch.rand(d_out, generator=g) < cancel
    # on those rows W = −s·B·A + a perturbation a thousandth of its size
    w[rows] = -scale * (B[rows] @ A) + 1e-3 * w[rows]
    return w.to(dtype), A, B


@settings(max_examples=60, deadline=None)
@given(case=norm_cases())
def test_efficient_norm_equals_dense(case):
    d_in, d_out, r, dtype, scale, cancel, seed = case
    w, A, B = _norm_inputs(*case)
    u = unit_roundoff(D.acc_dtype(dtype))
    tau = norm_tolerance(w, A, B, scale, u)
    ref = dense_norm(w, A, B, scale)
    for method in ("identity", "dense"):
        got = D.row_norms(w, A, B, scale, method=method)
        assert got.dtype == D.acc_dtype(dtype)
        diff = (got.double() - ref).abs()
        assert bool((diff <= tau).all()), f"{method}: |Δn| {float(diff.max()):.3g} > τ"


def test_cancellation_guard_is_needed():
    """Without the guard the identity loses every bit on a row where s·B·A ≈ −W."""
    w, A, B = _norm_inputs(64, 32, 8, torch.float32, 2.0, 1.0, seed=3)
    w[:, :] = (-2.0 * (B @ A) + 1e-4 * torch.randn(32, 64)).float()
    ref = dense_norm(w, A, B, 2.0)
    tau = norm_tolerance(w, A, B, 2.0, unit_roundoff(torch.float32))
    guarded = D.row_norms(w, A, B, 2.0, method="identity")
    assert bool(((guarded.double() - ref).abs() <= tau).all())
    old = D.CANCEL
    try:
        D.CANCEL = 0.0
        raw = D.row_norms(w, A, B, 2.0, method="identity")
    finally:
        D.CANCEL = old
    assert float(((raw.double() - ref).abs() / ref).max()) > 1e-2


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an operator allocates (views of inputs excluded)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_makes_no_full_size_temporary(dtype):
    d_in, d_out = 352, 384  # above DENSE_MAX_NUMEL: the identity
    assert D.norm_method(d_out, d_in) == "identity"
    m = layer_model(d_in, d_out, dtype)
    lorazoo.inject(m, "dora", targets=[nn.Linear], r=8, alpha=16)
    perturb(m, 0)
    x = torch.randn(3, 5, d_in).to(dtype)
    m.train()
    m(x).float().sum().backward()  # warms the ‖W_i‖² cache
    a = dora_of(m)
    with torch.no_grad():
        a.lora_A.add_(0.01)  # as an optimizer step would: the norm must be recomputed
    for grad in (True, False):
        rec = _Shapes()
        with torch.set_grad_enabled(grad), rec:
            y = m(x)
            if grad:
                y.float().sum().backward()
        assert rec.shapes, "nothing recorded"
        big = [(f, s) for f, s in rec.shapes if math.prod(s) >= d_out * d_in]
        assert not big, f"full-size temporaries: {big[:5]}"


def test_norm_cache_follows_the_base_weight():
    m = layer_model(400, 352, torch.float32)
    lorazoo.inject(m, "dora", targets=[nn.Linear], r=4)
    perturb(m, 1)
    host = next(iter(hosts(m)))[1]
    a = dora_of(m)
    x = torch.randn(6, 400)
    m.eval()

    def reference() -> torch.Tensor:
        w = host.weight.detach().double()
        n = dense_norm(w, a.lora_A, a.lora_B, a.scale)
        k = a.lora_magnitude_vector.double() / n
        z = x.double() @ w.T
        u = a.scale * (x.double() @ a.lora_A.double().T) @ a.lora_B.double().T
        return z + host.bias.double() + (k - 1) * z + k * u

    with torch.no_grad():
        m(x)
        host.weight.mul_(1.5)  # an ordinary in-place change: version counter moves
        got = m(x)
        assert torch.allclose(got.double(), reference(), rtol=1e-5, atol=1e-5)
        # a base rewrite through weight.data (what the engine does) leaves the version alone
        B0, A0 = torch.randn(352, 2), torch.randn(2, 400)
        host.patch_base("rewrite", B0, A0)
        got = m(x)
        assert torch.allclose(got.double(), reference(), rtol=1e-5, atol=1e-5)
        host.unpatch_base("rewrite")
        assert torch.allclose(m(x).double(), reference(), rtol=1e-5, atol=1e-5)


# ---- forward values and gradients ------------------------------------------------------------


def _plain(x, A, B, k, z_src, bias, scale):
    """The literal §6 formula, by autograd."""
    z = z_src - bias if bias is not None else z_src
    return (k - 1) * z + k * (scale * F.linear(F.linear(x, A), B))


def _function_inputs() -> tuple[torch.Tensor, ...]:
    """``x, A, B, k, z, b`` for gradchecks of the custom backward functions (fp64)."""
    g = torch.Generator().manual_seed(0)
    opts = {"dtype": torch.float64, "requires_grad": True}
    x = torch.randn(2, 3, 7, generator=g, **opts)
    A = torch.randn(3, 7, generator=g, **opts)
    B = torch.randn(5, 3, generator=g, **opts)
    k = (1 + 0.3 * torch.randn(5, generator=g, dtype=torch.float64)).requires_grad_()
    z = torch.randn(2, 3, 5, generator=g, **opts)
    b = torch.randn(5, generator=g, **opts)
    return x, A, B, k, z, b


def test_custom_backward_is_the_gradient():
    x, A, B, k, z, b = _function_inputs()
    fn = D._DoraContribution.apply
    assert torch.autograd.gradcheck(lambda *t: fn(*t, 1.7), (x, A, B, k, z, b))
    assert torch.autograd.gradcheck(lambda *t: fn(*t, None, 0.5), (x, A, B, k, z))
    out = fn(x, A, B, k, z, b, 1.7)
    with torch.no_grad():
        assert torch.equal(out, D.contribution(x, A, B, k, z, b, 1.7))
    assert torch.allclose(out, _plain(x, A, B, k, z, b, 1.7), rtol=1e-13, atol=1e-13)


def _grads(model, x, gout):
    for p in model.parameters():
        p.grad = None
    model(x).backward(gout)
    a = dora_of(model)
    return a.lora_A.grad.clone(), a.lora_B.grad.clone(), a.lora_magnitude_vector.grad.clone()


def _reference_grads(model, x, gout, detach: bool):
    """Gradients of the literal formula with n a constant tensor (detach) or a function of A, B."""
    host = next(iter(hosts(model)))[1]
    a = dora_of(model)
    A = a.lora_A.detach().clone().requires_grad_()
    B = a.lora_B.detach().clone().requires_grad_()
    mag = a.lora_magnitude_vector.detach().clone().requires_grad_()
    w = host.weight.detach()
    b = None if host.bias is None else host.bias.detach()
    n = torch.linalg.norm(w + a.scale * (B @ A), dim=1)
    if detach:
        n = n.detach().clone()
    k = mag / n
    base = F.linear(x, w, b)
    y = base + _plain(x, A, B, k, base, b, a.scale)
    y.backward(gout)
    return A.grad, B.grad, mag.grad


@pytest.mark.parametrize("shape", [(9, 6), (352, 384)])
def test_detached_norm_gradient(shape, method):
    d_in, d_out = shape
    m = layer_model(d_in, d_out, torch.float64)
    lorazoo.inject(m, "dora", targets=[nn.Linear], r=3, alpha=6)
    perturb(m, 2)
    m.train()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, d_in, generator=g, dtype=torch.float64)
    gout = torch.randn(4, d_out, generator=g, dtype=torch.float64)
    got = _grads(m, x, gout)
    detached = _reference_grads(m, x, gout, detach=True)
    attached = _reference_grads(m, x, gout, detach=False)
    for name, a, ref in zip("ABm", got, detached, strict=True):
        assert torch.allclose(a, ref, rtol=1e-10, atol=1e-12), f"∂{name} differs from the detached reference"
    assert not torch.allclose(got[0], attached[0], rtol=1e-6, atol=1e-8), "∂A ignores the detach"
    # detach_norm=False: the gradient through n as well
    m2 = layer_model(d_in, d_out, torch.float64)
    lorazoo.inject(m2, "dora", targets=[nn.Linear], r=3, alpha=6, detach_norm=False)
    perturb(m2, 2)
    m2.train()
    got2 = _grads(m2, x, gout)
    for name, a, ref in zip("ABm", got2, attached, strict=True):
        assert torch.allclose(a, ref, rtol=1e-10, atol=1e-12), f"∂{name} differs from the attached reference"


def _saved_outputs(model: nn.Module, x: torch.Tensor, d_out: int) -> list[int]:
    """Byte sizes of the distinct storages of output-sized activations (``d_out`` wide, one row
    per token) that autograd keeps for backward during ``model(x)``."""
    tokens = x.numel() // x.shape[-1]
    seen: dict[int, int] = {}

    def pack(t):
        if t.numel() == tokens * d_out and t.shape[-1] == d_out:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sorted(seen.values())


def _linear_silu(dtype: torch.dtype, bias: bool) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 80, bias=bias, dtype=dtype), nn.SiLU())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_backward_keeps_the_output_the_next_op_keeps(dtype, bias):
    """DoRA alone on a layer keeps the layer's output for backward, not a second tensor with
    ``W x``: before SiLU (which saves its input) the one output-sized activation kept is that
    tensor, as with LoRA; without a consumer, one output per layer."""
    out_bytes = 4 * 32 * 80 * torch.finfo(dtype).bits // 8
    x = torch.randn(4, 32, 96).to(dtype).requires_grad_()
    for variant in ("lora", "dora"):
        m = _linear_silu(dtype, bias)
        lorazoo.inject(m, variant, targets=[nn.Linear], r=4)
        perturb(m, 1)
        if variant == "dora":
            k_near_one(m)
        m.train()
        assert _saved_outputs(m, x, 80) == [out_bytes], variant
    assert _saved_outputs(m[0], x, 80) == [out_bytes]


def test_backward_keeps_the_base_output_where_it_cannot_recover_it():
    """The output path needs ``k`` away from 0 (with a bias, |k| ≥ 1/2) and no training dropout;
    otherwise the base output is kept beside the layer output, and the gradients are still
    the literal formula's."""
    x = torch.randn(4, 32, 96, dtype=torch.float64, requires_grad=True)
    gout = torch.randn(4, 32, 80, dtype=torch.float64)
    cases = {"k small with a bias": {}, "dropout": {"dropout": 0.1}}
    for case, hyper in cases.items():
        m = _linear_silu(torch.float64, bias=True)
        lorazoo.inject(m, "dora", targets=[nn.Linear], r=4, **hyper)
        perturb(m, 1)
        a = dora_of(m)
        if case == "k small with a bias":
            with torch.no_grad():
                a.lora_magnitude_vector.mul_(0.25)
        m.train()
        assert len(_saved_outputs(m, x, 80)) == 2, case
        if case == "k small with a bias":
            layer = nn.Sequential(m[0])
            got = _grads(layer, x, gout)
            ref = _reference_grads(layer, x, gout, detach=True)
            for name, g, r in zip("ABm", got, ref, strict=True):
                assert torch.allclose(g, r, rtol=1e-10, atol=1e-12), (case, name)


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_output_path_gradients_are_the_formula(detach, bias):
    """The path DoRA takes alone on a layer, against the literal formula's autograd gradients
    (fp64), with the norm detached and attached."""
    m = layer_model(40, 24, torch.float64, bias=bias)
    lorazoo.inject(m, "dora", targets=[nn.Linear], r=4, alpha=8, detach_norm=detach)
    perturb(m, 2)
    k_near_one(m, spread=0.3)
    host = next(iter(hosts(m)))[1]
    assert host._solo is not None
    assert D.recoverable(dora_of(m)._detached_norm(host.weight), host.bias)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 40, generator=g, dtype=torch.float64)
    gout = torch.randn(3, 7, 24, generator=g, dtype=torch.float64)
    m.train()
    got = _grads(m, x, gout)
    ref = _reference_grads(m, x, gout, detach=detach)
    for name, a, r in zip("ABm", got, ref, strict=True):
        assert torch.allclose(a, r, rtol=1e-10, atol=1e-12), f"∂{name}"


def test_recoverable():
    one = torch.ones(4)
    assert D.recoverable(one, None) and D.recoverable(one, one)
    assert D.recoverable(torch.tensor([1e-3, -2.0]), None)
    assert not D.recoverable(torch.tensor([1e-3, -2.0]), one[:2])
    assert D.recoverable(torch.tensor([0.5, -0.5]), one[:2])
    assert not D.recoverable(torch.tensor([0.0, 1.0]), None)
    assert not D.recoverable(torch.tensor([float("inf"), 1.0]), None)
    assert not D.recoverable(torch.tensor([float("nan"), 1.0]), None)


def test_output_backward_is_the_gradient():
    """The in-place output path's backward, by gradcheck (fp64, with and without a bias), and
    its value against the general path ``z + contribution``."""
    x, A, B, k, z, b = _function_inputs()
    assert D.recoverable(k, b)
    fn = D._DoraOutput.apply
    # z is written in place, so each evaluation gets a copy; also as a view of another tensor
    # (what F.linear returns for a contiguous 3-d input with a bias)
    assert torch.autograd.gradcheck(lambda *t: fn(t[4].clone(), *t[:4], t[5], 1.7), (x, A, B, k, z, b))
    assert torch.autograd.gradcheck(lambda *t: fn(t[4].clone(), *t[:4], None, 0.5), (x, A, B, k, z))
    view = lambda t: t.reshape(-1, t.shape[-1]).clone().view(t.shape)  # noqa: E731
    assert view(z)._base is not None
    assert torch.autograd.gradcheck(lambda *t: fn(view(t[4]), *t[:4], t[5], 1.7), (x, A, B, k, z, b))
    out = fn(z.clone(), x, A, B, k, b, 1.7)
    general = z + _plain(x, A, B, k, z, b, 1.7)
    assert torch.allclose(out, general, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_path_matches_the_general_path(dtype):
    """Alone on a layer DoRA finishes the output in place; beside another adapter it adds its
    contribution. With the other adapter contributing nothing (B = 0), the two agree within
    the §11 tolerance, and so do their gradients (bf16: adapters in fp32, output in bf16)."""
    torch.manual_seed(0)
    x = torch.randn(6, 40).to(dtype).requires_grad_()
    solo = layer_model(40, 24, dtype)
    lorazoo.inject(solo, "dora", targets=[nn.Linear], r=4, alpha=8)
    perturb(solo, 3)
    k_near_one(solo)
    pair = copy.deepcopy(solo)
    lorazoo.inject(pair, "lora", targets=[nn.Linear], r=4, name="zero")  # B = 0: adds exactly 0
    host = next(iter(hosts(solo)))[1]
    assert host._solo is not None and next(iter(hosts(pair)))[1]._solo is None
    assert D.recoverable(dora_of(solo)._detached_norm(host.weight), host.bias)
    ys = [m(x) for m in (solo, pair)]
    lr = dora_of(solo).lowrank(host.weight.detach())
    tau = merge_tolerance(x.detach(), host.weight, host.bias, [lr])
    assert ((ys[0] - ys[1]).abs() <= tau).all()
    gout = torch.randn_like(ys[0])
    grads = []
    for m, y in zip((solo, pair), ys, strict=True):
        y.backward(gout)
        a = dora_of(m)
        grads.append([a.lora_A.grad, a.lora_B.grad, a.lora_magnitude_vector.grad])
    rtol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, g1, g2 in zip("ABm", *grads, strict=True):
        assert torch.allclose(g1, g2, rtol=rtol, atol=rtol * float(g2.abs().max())), name


# ---- merge ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_property_after_merge(dtype, method):
    m = layer_model(40, 24, dtype)
    lorazoo.inject(m, "dora", targets=[nn.Linear], r=4, alpha=8)
    perturb(m, 3)
    a = dora_of(m)
    host = next(iter(hosts(m)))[1]
    w0 = host.weight.detach().clone()
    lorazoo.merge(m)
    row = torch.linalg.norm(host.weight.detach().double(), dim=1)
    mag = a.lora_magnitude_vector.detach().double()
    k = a.row_scale(w0).double()
    # the merged elements are k·(W + s·B·A) rounded to the storage dtype
    tau = k.abs() * norm_tolerance(w0, a.lora_A, a.lora_B, a.scale, unit_roundoff(dtype))
    assert bool(((row - mag.abs()).abs() <= tau).all())
    lorazoo.unmerge(m)
    assert torch.equal(_bits(host.weight), _bits(w0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reduces_to_lora(dtype):
    """With m := ‖W + s·B·A‖_row, DoRA's forward is LoRA's."""
    base = layer_model(30, 20, dtype)
    dora_m, lora_m = copy.deepcopy(base), copy.deepcopy(base)
    lorazoo.inject(dora_m, "dora", targets=[nn.Linear], r=4, alpha=8)
    lorazoo.inject(lora_m, "lora", targets=[nn.Linear], r=4, alpha=8)
    perturb(dora_m, 4)
    a, lo = dora_of(dora_m), dora_of(lora_m)
    host = next(iter(hosts(dora_m)))[1]
    with torch.no_grad():
        lo.lora_A.copy_(a.lora_A)
        lo.lora_B.copy_(a.lora_B)
        a.lora_magnitude_vector.copy_(dense_norm(host.weight, a.lora_A, a.lora_B, a.scale))
    x = torch.randn(5, 30, dtype=dtype)
    dora_m.eval(), lora_m.eval()
    with torch.no_grad():
        yd, yl = dora_m(x), lora_m(x)
        tau = merge_tolerance(x, host.weight, host.bias, [a.lowrank(host.weight)])
    assert float((yd - yl).abs().max()) > 0 or dtype == torch.float64
    assert bool(((yd.double() - yl.double()).abs() <= tau).all())


@pytest.mark.parametrize("order", [("dora", "lora"), ("lora", "dora")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_lora_and_dora_on_one_layer(order, dtype):
    m = layer_model(48, 40, dtype)
    for i, variant in enumerate(order):
        lorazoo.inject(m, variant, targets=[nn.Linear], r=4, alpha=8, name=f"a{i}")
    perturb(m, 5)
    host = next(iter(hosts(m)))[1]
    w0 = host.weight.detach().clone()
    x = torch.randn(2, 7, 48).to(dtype)
    m.eval()
    lowranks = [host.adapters[n].lowrank(w0) for n in ("a0", "a1")]
    with torch.no_grad():
        unmerged = m(x)
        lorazoo.merge(m)
        merged = m(x)
    tau = merge_tolerance(x, w0, host.bias, lowranks, dtype)
    assert bool(((merged.double() - unmerged.double()).abs() <= tau).all())
    # in fp64 the sum is exact to rounding: compare with the literal formula
    if dtype == torch.float64:
        d = host.adapters["a0" if order[0] == "dora" else "a1"]
        lo = host.adapters["a1" if order[0] == "dora" else "a0"]
        n = dense_norm(w0, d.lora_A, d.lora_B, d.scale)
        k = d.lora_magnitude_vector / n
        z = x @ w0.T
        ref = z + host.bias + (k - 1) * z + k * (d.scale * (x @ d.lora_A.T) @ d.lora_B.T)
        ref = ref + lo.scale * (x @ lo.lora_A.T) @ lo.lora_B.T
        assert torch.allclose(unmerged, ref, rtol=1e-12, atol=1e-12)
    lorazoo.unmerge(m)
    assert torch.equal(_bits(host.weight), _bits(w0))


# ---- files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip(dtype):
    base = layer_model(33, 21, dtype)
    fresh = copy.deepcopy(base)
    lorazoo.inject(base, "dora", targets=[nn.Linear], r=4, alpha=8, rslora=True)
    perturb(base, 6)
    x = torch.randn(3, 33).to(dtype)
    base.eval()
    with torch.no_grad():
        y = base(x)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dora.safetensors"
        lorazoo.save(base, path)
        lorazoo.load(fresh, path)
    a, b = dora_of(base), dora_of(fresh)
    assert b.config.rslora and b.config.detach_norm
    for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
        t1, t2 = getattr(a, name), getattr(b, name)
        assert t1.dtype == t2.dtype and torch.equal(_bits(t1), _bits(t2)), name
    assert not torch.equal(a.lora_magnitude_vector, a.row_scale(next(iter(hosts(base)))[1].weight))
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(_bits(fresh(x)), _bits(y))


# ---- state dict, pickling, inference mode, the traced norm -----------------------------------


def _two_layers(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 24, dtype=dtype), nn.SiLU(), nn.Linear(24, 6, dtype=dtype))


def test_state_dict_has_only_base_and_adapter_keys():
    """The model's state dict holds the base tensors under their own keys and each adapter's
    three tensors under ``<layer>.adapters.<name>.``, once: a base checkpoint loads with
    ``strict=True`` and safetensors writes the state dict (no two keys share memory)."""
    from safetensors.torch import load_file, save_file

    model = _two_layers()
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lorazoo.inject(model, "dora", targets=[nn.Linear], r=4)
    perturb(model, 0)
    adapter_keys = {
        f"{layer}.adapters.default.{t}"
        for layer in "02"
        for t in ("lora_A", "lora_B", "lora_magnitude_vector")
    }
    sd = model.state_dict()
    assert set(sd) == set(base_sd) | adapter_keys
    x = torch.randn(3, 20)
    with torch.no_grad():
        y = model(x)
        for _, host in hosts(model):
            host.weight.mul_(2)  # so the load below has something to restore
    result = model.load_state_dict(base_sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    result = model.load_state_dict(base_sd, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        assert torch.equal(model(x), y)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_file(model.state_dict(), str(path))
        back = load_file(str(path))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_pickle_whole_model():
    """``torch.save(model)`` / ``torch.load`` of a DoRA model after a forward (which fills the
    norm cache): the loaded copy gives the same outputs and gradients, and merges and unmerges
    exactly."""
    import io

    model = _two_layers()
    lorazoo.inject(model, "dora", targets=[nn.Linear], r=4)
    perturb(model, 2)
    x = torch.randn(5, 20)
    model.eval()
    with torch.no_grad():
        y = model(x)
    w0 = [h.weight.detach().clone() for _, h in hosts(model)]
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copy_ = torch.load(buf, weights_only=False)
    assert all(h._solo is h.adapters["default"] for _, h in hosts(copy_))
    assert all(torch.equal(_bits(h.weight), _bits(w)) for (_, h), w in zip(hosts(copy_), w0, strict=True))
    with torch.no_grad():
        assert torch.equal(copy_(x), y)
        lorazoo.merge(copy_)
        assert ((copy_(x) - y).abs() <= 1e-5 * y.abs().max()).all()
        lorazoo.unmerge(copy_)
    assert all(torch.equal(_bits(h.weight), _bits(w)) for (_, h), w in zip(hosts(copy_), w0, strict=True))
    model.train(), copy_.train()
    grads = []
    for m in (model, copy_):
        m(x).pow(2).sum().backward()
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize("inject_inside", [False, True])
def test_inference_mode_forward(inject_inside):
    """A forward under ``torch.inference_mode()``, also after injecting under it (inference
    tensors have no version counter to key the norm cache on), gives the eager output; and a
    forward in inference mode leaves nothing behind that breaks training afterwards."""
    model, ref = _two_layers(), _two_layers()
    torch.manual_seed(1)  # the same factors in both
    lorazoo.inject(ref, "dora", targets=[nn.Linear], r=4)
    x = torch.randn(5, 20)
    torch.manual_seed(1)
    with torch.no_grad():
        y = ref(x)
    if inject_inside:
        with torch.inference_mode():
            lorazoo.inject(model, "dora", targets=[nn.Linear], r=4)
            assert torch.equal(model(x), y)
            assert torch.equal(model(x), y)  # a second call (the cache, if any, is not stale)
        return
    lorazoo.inject(model, "dora", targets=[nn.Linear], r=4)
    perturb(model, 3), perturb(ref, 3)
    with torch.no_grad():
        y = ref(x)
    with torch.inference_mode():
        assert torch.equal(model(x), y)
    model(x).pow(2).sum().backward()
    ref(x).pow(2).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)


def test_traced_norm_gradient():
    """The norm operator used under ``torch.compile`` and its analytic gradient
    (:func:`row_norm_grads`), by gradcheck in fp64, with rows where ``W ≈ −s·B·A`` (the
    cancellation guard) and a zero row; and a bf16 weight against autograd on the fp32 copy."""
    w, A, B = _norm_inputs(9, 7, 3, torch.float64, 2.0, 0.4, seed=1)
    A.requires_grad_(), B.requires_grad_()
    for method in (0, 1 << 40):  # identity, dense
        old = D.DENSE_MAX_NUMEL
        try:
            D.DENSE_MAX_NUMEL = method
            assert torch.autograd.gradcheck(lambda a, b: D._traced_row_norms(w, a, b, 2.0), (A, B))
        finally:
            D.DENSE_MAX_NUMEL = old
    w0 = w.clone()
    w0[2] = 0
    A0, B0 = A.detach().clone().requires_grad_(), B.detach().clone()
    B0[2] = 0
    B0.requires_grad_()
    n = D._traced_row_norms(w0, A0, B0, 2.0)
    assert float(n[2]) == 0
    g = torch.randn(7, dtype=torch.float64)
    (n * g).sum().backward()
    ref_A, ref_B = A0.detach().clone().requires_grad_(), B0.detach().clone().requires_grad_()
    (D.row_norms(w0, ref_A, ref_B, 2.0) * g).sum().backward()
    assert torch.isfinite(A0.grad).all() and torch.isfinite(B0.grad).all()
    assert torch.allclose(A0.grad, ref_A.grad, rtol=1e-12, atol=1e-12)
    assert torch.allclose(B0.grad, ref_B.grad, rtol=1e-12, atol=1e-12)
    wb = torch.randn(300, 200).to(torch.bfloat16)
    a = (0.1 * torch.randn(4, 200)).requires_grad_()
    b = (0.1 * torch.randn(300, 4)).requires_grad_()
    gA, gB = D.row_norm_grads(wb, a, b, 1.5, D.row_norms(wb, a, b, 1.5).detach(), torch.ones(300))
    a2, b2 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    torch.linalg.norm(wb.double() + 1.5 * (b2 @ a2), dim=1).sum().backward()
    assert torch.allclose(gA.double(), a2.grad, rtol=1e-4, atol=1e-4 * float(a2.grad.abs().max()))
    assert torch.allclose(gB.double(), b2.grad, rtol=1e-4, atol=1e-4 * float(b2.grad.abs().max()))


@pytest.mark.parametrize("bias", [True, False])
def test_output_path_gradients_through_stacked_layers(bias):
    """DoRA alone on two stacked square layers, 3-d input (the base output is then a view when
    there is a bias): every gradient, the input's included, equals the general path's, which
    runs beside an adapter that adds exactly zero (fp64)."""
    torch.manual_seed(0)
    dt = torch.float64
    solo = nn.Sequential(
        nn.Linear(16, 16, bias=bias, dtype=dt), nn.SiLU(), nn.Linear(16, 16, bias=bias, dtype=dt)
    )
    lorazoo.inject(solo, "dora", targets=[nn.Linear], r=4)
    perturb(solo, 1)
    k_near_one(solo)
    pair = copy.deepcopy(solo)
    lorazoo.inject(pair, "lora", targets=[nn.Linear], r=4, name="zero")
    assert all(h._solo is not None for _, h in hosts(solo))
    x = torch.randn(3, 5, 16, dtype=dt, requires_grad=True)
    grads = []
    for m in (solo, pair):
        x.grad = None
        m(x).square().sum().backward()
        named = {n: p.grad for n, p in m.named_parameters() if p.requires_grad and ".zero." not in n}
        grads.append({"x": x.grad.clone(), **named})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 7
    for name, g in grads[1].items():
        assert torch.allclose(grads[0][name], g, rtol=1e-10, atol=1e-12 * float(g.abs().max())), name
