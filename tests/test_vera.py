"""VeRA (docs/spec/variants.md §8): shared frozen projections, per-layer vectors, tiny files."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lorazoo_plugins.vera import VeRA, generate_projections
from safetensors.torch import load_file
from torch import nn

import lorazoo
from lorazoo.engine.inject import hosts
from lorazoo.io import read
from lorazoo.testing import Case, merge_tolerance
from lorazoo.testing.conformance import check_dropout, check_perturbed_differs


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}
    return t.detach().contiguous().view(ints[t.element_size()])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


class Mixed(nn.Module):
    """Layers of different shapes, two of them equal, applied side by side."""

    def __init__(self, shapes, dtype=torch.float32):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o, dtype=dtype) for i, o in shapes)

    def forward(self, xs):
        return [layer(x) for layer, x in zip(self.layers, xs, strict=True)]


SHAPES = [(12, 20), (30, 8), (12, 20), (5, 5)]


def _mixed(seed: int = 0, dtype=torch.float32, shapes=SHAPES) -> tuple[Mixed, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = Mixed(shapes, dtype)
    xs = [torch.randn(3, i).to(dtype) for i, _ in shapes]
    return model, xs


@torch.no_grad()
def _perturb(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, h in hosts(model):
        for a in h.adapters.values():
            a.vera_lambda_b.add_(torch.randn(a.vera_lambda_b.shape, generator=g).to(a.vera_lambda_b))
            a.vera_lambda_d.add_(torch.randn(a.vera_lambda_d.shape, generator=g).to(a.vera_lambda_d) * 0.1)


def _reference_projections(r: int, in_max: int, out_max: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The §8 rule spelled out step by step (kaiming-uniform, gain √2, fan_in = second dim)."""
    g = torch.Generator("cpu")
    g.manual_seed(key)
    a = torch.empty((r, in_max), dtype=torch.float32)
    a.uniform_(-math.sqrt(6 / in_max), math.sqrt(6 / in_max), generator=g)
    b = torch.empty((out_max, r), dtype=torch.float32)
    b.uniform_(-math.sqrt(6 / r), math.sqrt(6 / r), generator=g)
    return a, b


@given(
    r=st.integers(1, 40),
    in_max=st.integers(1, 64),
    out_max=st.integers(1, 64),
    key=st.integers(0, 2**40),
)
def test_projections_follow_the_rule_bit_for_bit(r: int, in_max: int, out_max: int, key: int) -> None:
    """Invariant 2 (regeneration bit-exact): A first, then B, fp32 uniform(±√(6/fan_in)) from a
    CPU generator seeded with the key; the rule, not a cached tensor, decides the bits."""
    a, b = generate_projections(r, in_max, out_max, key)
    ra, rb = _reference_projections(r, in_max, out_max, key)
    assert _same_bits(a, ra) and _same_bits(b, rb)
    assert float(a.abs().max()) <= math.sqrt(6 / in_max) and float(b.abs().max()) <= math.sqrt(6 / r)


def test_projections_depend_on_the_key_and_shape_takes_the_largest_target() -> None:
    model, _ = _mixed()
    lorazoo.inject(model, "vera", targets=[nn.Linear], r=16, projection_prng_key=7)
    shared = {id(h.adapters["default"].shared) for _, h in hosts(model)}
    assert len(shared) == 1, "one pair per injection"
    proj = hosts(model)[0][1].adapters["default"].shared
    assert tuple(proj.vera_A.shape) == (16, 30) and tuple(proj.vera_B.shape) == (20, 16)
    a7, b7 = generate_projections(16, 30, 20, 7)
    assert _same_bits(proj.vera_A, a7) and _same_bits(proj.vera_B, b7)
    a0, _ = generate_projections(16, 30, 20, 0)
    assert not torch.equal(a0, a7)


def test_init_identity_is_bitwise_and_lambdas_start_as_specified() -> None:
    model, xs = _mixed()
    model.eval()
    with torch.no_grad():
        base = model(xs)
    lorazoo.inject(model, "vera", targets=[nn.Linear], r=24, d_initial=0.25)
    with torch.no_grad():
        out = model(xs)
    for y, y0 in zip(out, base, strict=True):
        assert _same_bits(y, y0)
    for _, h in hosts(model):
        a = h.adapters["default"]
        assert torch.equal(a.vera_lambda_b, torch.zeros(h.out_features))
        assert torch.equal(a.vera_lambda_d, torch.full((24,), 0.25))


def test_same_shape_layers_share_slices_of_one_storage() -> None:
    """Invariant 4, and the top-left slicing of every layer."""
    model, _ = _mixed()
    lorazoo.inject(model, "vera", targets=[nn.Linear], r=16)
    adapters = [h.adapters["default"] for _, h in hosts(model)]
    proj = adapters[0].shared
    for a, (d_in, d_out) in zip(adapters, SHAPES, strict=True):
        sa, sb = a.projections
        assert sa.untyped_storage().data_ptr() == proj.vera_A.untyped_storage().data_ptr()
        assert sb.untyped_storage().data_ptr() == proj.vera_B.untyped_storage().data_ptr()
        assert torch.equal(sa, proj.vera_A[:, :d_in]) and torch.equal(sb, proj.vera_B[:d_out, :])
    (a0, b0), (a2, b2) = adapters[0].projections, adapters[2].projections
    assert (a0.data_ptr(), a0.shape, a0.stride()) == (a2.data_ptr(), a2.shape, a2.stride())
    assert (b0.data_ptr(), b0.shape, b0.stride()) == (b2.data_ptr(), b2.shape, b2.stride())


def test_projections_are_frozen_out_of_optimizer_and_counted_once() -> None:
    """Invariants 3 and 6: not trainable, no gradient, in no optimizer group, not counted; the
    trainable count is Σ (d_out + r)."""
    model, xs = _mixed()
    total = sum(p.numel() for p in model.parameters())
    r = 300  # larger than every layer dimension: allowed for VeRA
    lorazoo.inject(model, "vera", targets=[nn.Linear], r=r)
    count = lorazoo.trainable(model)
    expected = sum(o + r for _, o in SHAPES)
    assert count.trainable == expected and count.total == total + expected
    proj = hosts(model)[0][1].adapters["default"].shared
    frozen = {id(proj.vera_A), id(proj.vera_B)}
    assert not proj.vera_A.requires_grad and not proj.vera_B.requires_grad
    assert not frozen & {id(p) for p in model.parameters()}
    buffers = [b for b in model.buffers() if id(b) in frozen]
    assert len(buffers) == 2, "the pair must appear once among the model's buffers"
    grouped = [p for g in lorazoo.param_groups(model, lr=1e-2) for p in g["params"]]
    assert not frozen & {id(p) for p in grouped}
    assert len(grouped) == 2 * len(SHAPES)
    _perturb(model)
    sum(y.pow(2).sum() for y in model(xs)).backward()
    assert proj.vera_A.grad is None and proj.vera_B.grad is None


def test_first_step_moves_lambda_b_only() -> None:
    """The training note of §8: with λ_b = 0 the gradient of λ_d is exactly zero at first."""
    model, xs = _mixed()
    lorazoo.inject(model, "vera", targets=[nn.Linear], r=8)
    sum(y.pow(2).sum() for y in model(xs)).backward()
    for _, h in hosts(model):
        a = h.adapters["default"]
        assert torch.equal(a.vera_lambda_d.grad, torch.zeros_like(a.vera_lambda_d))
        assert float(a.vera_lambda_b.grad.abs().max()) > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_merged_matches_unmerged_and_unmerge_is_exact(dtype: torch.dtype) -> None:
    """Invariant 5, with the slices the forward uses; unmerge then gives the base bit for bit."""
    model, xs = _mixed(dtype=dtype)
    lorazoo.inject(model, "vera", targets=[nn.Linear], r=32)
    _perturb(model)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    hs = [h for _, h in hosts(model)]
    lowranks = [h.adapters["default"].lowrank() for h in hs]
    weights = [h.weight.detach().clone() for h in hs]
    with torch.no_grad():
        unmerged = model(xs)
        lorazoo.merge(model)
        merged = model(xs)
    for x, ym, yu, h, lr, w in zip(xs, merged, unmerged, hs, lowranks, weights, strict=True):
        tau = merge_tolerance(x, w, h.bias, [lr], dtype)
        diff = (ym.double() - yu.double()).abs()
        assert bool((diff <= tau).all()), f"merged vs unmerged differ by {float(diff.max()):.3g}"
        assert float((ym.double() - x.double() @ w.double().T).abs().max()) > 0
    lorazoo.unmerge(model)
    for k, v in model.state_dict().items():
        if k in before:
            assert _same_bits(v, before[k]), k


def test_lowrank_form_is_the_scaled_projections() -> None:
    """lowrank() = (λ_d ⊙ A_sl, λ_b ⊙ B_sl, 1, None) and delta_weight = diag(λ_b)·B_sl·diag(λ_d)·A_sl
    (fp64 model, so the bound is fp64 rounding of the r-term products: (r + 2)·u₆₄·|…|)."""
    model, _ = _mixed(dtype=torch.float64)
    r = 6
    lorazoo.inject(model, "vera", targets=[nn.Linear], r=r)
    _perturb(model)
    host = hosts(model)[1][1]
    a = host.adapters["default"]
    lr = a.lowrank()
    sa, sb = a.projections
    assert lr.scale == 1.0 and lr.row_scale is None
    assert torch.equal(lr.A, a.vera_lambda_d[:, None] * sa)
    assert torch.equal(lr.B, a.vera_lambda_b[:, None] * sb)
    lb, ld = a.vera_lambda_b.detach(), a.vera_lambda_d.detach()
    expect = torch.diag(lb) @ sb @ torch.diag(ld) @ sa
    size = torch.diag(lb.abs()) @ sb.abs() @ torch.diag(ld.abs()) @ sa.abs()
    got = a.delta_weight(host.weight.detach())
    u64 = torch.finfo(torch.float64).eps / 2
    assert bool(((got - expect).abs() <= 2 * (r + 2) * u64 * size).all())
    assert float(size.max()) > 0


def test_alpha_has_no_effect() -> None:
    """VeRA has no scale: any valid alpha gives the same adapter, bit for bit."""
    outs = []
    for alpha in (1.0, 64.0):
        model, xs = _mixed()
        lorazoo.inject(model, "vera", targets=[nn.Linear], r=8, alpha=alpha)
        _perturb(model)
        model.eval()
        with torch.no_grad():
            outs.append(model(xs))
    for y1, y2 in zip(*outs, strict=True):
        assert _same_bits(y1, y2)


def test_config_validation() -> None:
    cfg = lorazoo.variant("vera").config_class
    assert cfg().r == 256 and cfg().d_initial == 0.1 and cfg().save_projection is False
    with pytest.raises(lorazoo.ConfigError, match="d_initial must be a finite non-zero"):
        cfg(d_initial=0.0)
    with pytest.raises(lorazoo.ConfigError, match="projection_prng_key must be an integer"):
        cfg(projection_prng_key=-1)
    with pytest.raises(lorazoo.ConfigError, match="save_projection must be True or False"):
        cfg(save_projection=1)
    with pytest.raises(lorazoo.ConfigError, match="did you mean 'd_initial'"):
        cfg.from_kwargs(d_init=0.1)


def test_mixed_adapter_dtypes_are_refused_and_the_model_is_unchanged() -> None:
    model = nn.Sequential(nn.Linear(4, 4, dtype=torch.float64), nn.Linear(4, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorazoo.ConfigError, match="one device with one adapter dtype"):
        lorazoo.inject(model, "vera", targets=[nn.Linear], r=4)
    assert not hosts(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_perturbation_hidden_by_output_rounding_is_accepted_only_when_tiny() -> None:
    """With key 0 the single projection entry of a 1-input layer is −0.0183·…, so in bf16 the
    perturbed effect can fall below half an ulp of the output; the conformance check accepts that
    only because the exact effect is non-zero and below the output's rounding."""
    case = Case(shapes=((1, 1, False),), r=1, alpha=0.5, dtype=torch.bfloat16, batch=(1,), seed=1)
    check_perturbed_differs("vera", case)
    assert abs(float(generate_projections(1, 1, 1, 0)[0])) < 0.02


class _MuteVeRA(VeRA):
    """A broken VeRA whose forward drops its contribution while lowrank() still reports it."""

    name = "mute_vera_for_test"

    def forward(self, x, base_out, host):
        return torch.zeros_like(base_out)


class _MutePlugin:
    @lorazoo.hookimpl
    def lorazoo_variants(self):
        return [_MuteVeRA]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbed_differs_still_catches_an_adapter_without_effect(dtype: torch.dtype) -> None:
    """The rounding allowance above does not let a variant whose forward does nothing pass."""
    plugin = _MutePlugin()
    lorazoo.register(plugin)
    try:
        case = Case(shapes=((16, 8, True),), r=4, alpha=1.0, dtype=dtype, batch=(3,), seed=2)
        with pytest.raises(AssertionError, match="larger than the output's rounding"):
            check_perturbed_differs("mute_vera_for_test", case)
    finally:
        lorazoo.unregister(plugin)
    assert "mute_vera_for_test" not in lorazoo.variants()


class _DrylessVeRA(VeRA):
    """A broken VeRA that ignores its dropout."""

    name = "dryless_vera_for_test"

    def forward(self, x, base_out, host):
        a, b = self.projections
        return torch.nn.functional.linear(x.float() @ a.T * self.vera_lambda_d, b) * self.vera_lambda_b


class _DrylessPlugin:
    @lorazoo.hookimpl
    def lorazoo_variants(self):
        return [_DrylessVeRA]


def test_dropout_check_accepts_hidden_contributions_and_still_catches_missing_dropout() -> None:
    """check_dropout: a 1×1 bf16 VeRA layer (key 0) contributes less than the output's rounding,
    so two dropout forwards may agree; a variant that ignores dropout still fails."""
    tiny = Case(shapes=((1, 1, False),), r=1, alpha=0.5, dtype=torch.bfloat16, batch=(1,), seed=8)
    check_dropout("vera", tiny)
    plugin = _DrylessPlugin()
    lorazoo.register(plugin)
    try:
        case = Case(shapes=((16, 8, True),), r=4, alpha=1.0, dtype=torch.float32, batch=(3,), seed=2)
        with pytest.raises(AssertionError, match="two forwards should differ"):
            check_dropout("dryless_vera_for_test", case)
    finally:
        lorazoo.unregister(plugin)


# ---- files -----------------------------------------------------------------------------------


class Stack(nn.Module):
    def __init__(self, n: int = 8, d: int = 512):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def test_acceptance_8x512_r256_file_is_tiny_and_reloads_bit_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    model = Stack()
    fresh = copy.deepcopy(model)
    lorazoo.inject(model, "vera", targets=[nn.Linear], r=256)
    _perturb(model)
    model.eval()
    x = torch.randn(4, 512)
    with torch.no_grad():
        y = model(x)
    path = lorazoo.save(model, tmp_path / "vera.safetensors")
    size = path.stat().st_size
    assert size < 40_000, f"VeRA file is {size} bytes"
    keys = set(load_file(path))
    assert keys == {f"layers.{i}.vera_lambda_{v}" for i in range(8) for v in "bd"}
    doc, _ = read(path)
    meta = doc["modules"]["layers.0"]["projection"]
    assert meta["key"] == 0 and meta["shape_A"] == [256, 512] and meta["stored"] is False
    lorazoo.load(fresh, path)
    fresh.eval()
    for (_, h1), (_, h2) in zip(hosts(model), hosts(fresh), strict=True):
        a1, a2 = h1.adapters["default"], h2.adapters["default"]
        for t1, t2 in zip((*a1.parameters(), *a1.buffers()), (*a2.parameters(), *a2.buffers()), strict=True):
            assert _same_bits(t1, t2)
    with torch.no_grad():
        assert _same_bits(fresh(x), y)


def test_save_projection_stores_the_pair_once_and_round_trips(tmp_path) -> None:
    torch.manual_seed(0)
    model = Stack()
    fresh = copy.deepcopy(model)
    lorazoo.inject(model, "vera", targets=[nn.Linear], r=256, save_projection=True, projection_prng_key=3)
    _perturb(model)
    model.eval()
    x = torch.randn(4, 512)
    with torch.no_grad():
        y = model(x)
    path = lorazoo.save(model, tmp_path / "vera_proj.safetensors")
    tensors = load_file(path)
    shared = sorted(k for k in tensors if k.startswith("__shared__."))
    assert shared == ["__shared__.vera_A", "__shared__.vera_B"], "the pair must be stored once"
    assert not any("vera_A" in k or "vera_B" in k for k in tensors if not k.startswith("__shared__."))
    assert path.stat().st_size > 2 * 256 * 512 * 4
    proj = hosts(model)[0][1].adapters["default"].shared
    assert _same_bits(tensors["__shared__.vera_A"], proj.vera_A)
    lorazoo.load(fresh, path)
    fresh.eval()
    with torch.no_grad():
        assert _same_bits(fresh(x), y)
    fproj = hosts(fresh)[0][1].adapters["default"].shared
    assert _same_bits(fproj.vera_A, proj.vera_A) and _same_bits(fproj.vera_B, proj.vera_B)


def test_stored_projections_are_used_on_load(tmp_path) -> None:
    """With save_projection the file's matrices, not a regeneration, end up in the model."""
    torch.manual_seed(0)
    model = Mixed([(6, 4), (4, 6)])
    fresh = copy.deepcopy(model)
    lorazoo.inject(model, "vera", targets=[nn.Linear], r=4, save_projection=True)
    with torch.no_grad():
        hosts(model)[0][1].adapters["default"].shared.vera_A.mul_(2.0)
    path = lorazoo.save(model, tmp_path / "v.safetensors")
    lorazoo.load(fresh, path)
    got = hosts(fresh)[0][1].adapters["default"].shared.vera_A
    assert torch.equal(got, hosts(model)[0][1].adapters["default"].shared.vera_A)
    doc = json.loads(json.dumps(read(path)[0]))
    assert doc["config"]["save_projection"] is True


def test_rank_above_layer_size_works_end_to_end(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    fresh = copy.deepcopy(model)
    lorazoo.inject(model, "vera", targets=[nn.Linear], r=64)
    assert isinstance(model[0].adapters["default"], VeRA)
    _perturb(model)
    model.eval()
    x = torch.randn(2, 4)
    with torch.no_grad():
        y = model(x)
    lorazoo.load(fresh, lorazoo.save(model, tmp_path / "a.safetensors"))
    fresh.eval()
    with torch.no_grad():
        assert _same_bits(fresh(x), y)


def test_projections_match_peft_bit_for_bit() -> None:
    """PEFT 0.21.2 draws the same pair for the same key and targets (docs/spec/variants.md §8)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = Mixed([(12, 20), (30, 8)])
    twin = copy.deepcopy(model)
    pm = peft.get_peft_model(
        model, peft.VeraConfig(r=16, target_modules=["layers.0", "layers.1"], projection_prng_key=5)
    )
    lorazoo.inject(twin, "vera", targets=[nn.Linear], r=16, projection_prng_key=5)
    proj = hosts(twin)[0][1].adapters["default"].shared
    assert _same_bits(pm.base_model.vera_A["default"], proj.vera_A)
    assert _same_bits(pm.base_model.vera_B["default"], proj.vera_B)
