"""Conformance checks every variant must pass; the property tests run them for every registered
variant, and a third-party plugin runs them on its own with :func:`run_conformance`.

Each ``check_*`` takes a variant name and a :class:`Case` (shapes, rank, alpha, dtype, batch,
seed), builds a small model of independent ``nn.Linear`` layers (layers of each registered layer
kind, from the kind's ``example``, for :func:`check_kind`), and raises ``AssertionError``
with the offending figures when the variant breaks an invariant of docs/spec/variants.md §12. The checks
use only the public API and a variant's declared math (``lowrank``, ``num_trainable``,
``exact_at_init``), so they apply to any plugin unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import lorazoo

from .. import registry
from ..engine.exact import acc_dtype
from ..engine.host import AdaptedLayer
from ..engine.inject import hosts, iter_adapters
from ..engine.kinds import LayerKind
from ..variant import LowRank, Variant
from .tolerance import (
    RHO,
    accumulation_roundoff,
    magnitude,
    merge_tolerance,
    smallest_subnormal,
    unit_roundoff,
)

# Largest |y_merged − y_unmerged| / (u_s·M) seen per dtype, for reporting.
STATS: dict[str, float] = {}
# Largest bytes held per merged element, and the share of elements kept as wide entries.
MERGE_BYTES: dict[str, float] = {}


@dataclass(frozen=True)
class Case:
    """One drawn configuration: independent layers ``(d_in, d_out, bias)``, rank, alpha, …"""

    shapes: tuple[tuple[int, int, bool], ...]
    r: int
    alpha: float
    dtype: torch.dtype
    batch: tuple[int, ...] = (3,)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    device: str = "cpu"

    def __repr__(self) -> str:  # shows up in hypothesis' falsifying examples
        return (
            f"Case(shapes={self.shapes}, r={self.r}, alpha={self.alpha}, dtype={self.dtype}, "
            f"batch={self.batch}, seed={self.seed}, device={self.device!r})"
        )

    def with_(self, **changes: Any) -> Case:
        return dataclasses.replace(self, **changes)


@st.composite
def cases(
    draw: Callable,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
    max_dim: int = 64,
    max_r: int = 16,
    max_layers: int = 3,
) -> Case:
    """Hypothesis strategy over :class:`Case` (docs/spec/variants.md §12: ``d_in, d_out ∈ [1, 64]``,
    ``r ∈ [1, min(d_in, d_out, 16)]``)."""
    n = draw(st.integers(1, max_layers))
    shapes = tuple(
        (draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim)), draw(st.booleans())) for _ in range(n)
    )
    r_max = min(max_r, *(min(i, o) for i, o, _ in shapes))
    return Case(
        shapes=shapes,
        r=draw(st.integers(1, r_max)),
        alpha=draw(st.sampled_from([0.5, 1.0, 2.0, 8.0, 16.0, 32.0])),
        dtype=draw(st.sampled_from(list(dtypes))),
        batch=draw(st.sampled_from([(1,), (3,), (2, 5)])),
        seed=draw(st.integers(0, 2**16)),
    )


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------


class Layers(nn.Module):
    """Independent linear layers; ``forward(xs)`` applies layer i to ``xs[i]``."""

    def __init__(self, shapes: Sequence[tuple[int, int, bool]], dtype: torch.dtype):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=b, dtype=dtype) for i, o, b in shapes)

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        return [layer(x) for layer, x in zip(self.layers, xs, strict=True)]


def build(case: Case, variant: str | None = None) -> tuple[Layers, list[Tensor]]:
    """The base model and inputs of a case (values bounded so nothing overflows in fp16). For a
    variant whose class asks for a quantised base (``base_storage = "nf4"``, QLoRA) the layers
    are quantised to NF4 (:func:`lorazoo.quantize`): that is the base it adapts, so the checks
    compare with it and their tolerances are relative to its dequantised weight."""
    torch.manual_seed(case.seed)
    model = Layers(case.shapes, case.dtype).to(case.device)
    if variant is not None and getattr(lorazoo.variant(variant), "base_storage", "dense") == "nf4":
        lorazoo.quantize(model, targets=[nn.Linear])
    g = torch.Generator().manual_seed(case.seed + 1)
    xs = [
        torch.randn(*case.batch, i, generator=g).clamp(-4, 4).to(case.dtype).to(case.device)
        for i, _, _ in case.shapes
    ]
    return model, xs


def adapt(model: nn.Module, variant: str, case: Case, name: str = "default", **overrides: Any) -> nn.Module:
    """Inject ``variant`` into every layer with the case's rank and alpha."""
    cls = lorazoo.variant(variant)
    hyper = {"r": case.r, "alpha": case.alpha, **cls.example_config, **case.extra, **overrides}
    return lorazoo.inject(model, variant, targets=[nn.Linear], name=name, **hyper)


@torch.no_grad()
def perturb(model: nn.Module, seed: int, name: str | None = None) -> None:
    """Move every trainable adapter tensor away from its initial value, by noise comparable to
    its own size (or to ``1/√fan`` for tensors that start at zero), so the adapter's
    contribution is of the same order as the base output."""
    g = torch.Generator().manual_seed(seed)
    for _, n, adapter in iter_adapters(model):
        if name is not None and n != name:
            continue
        for p in adapter.parameters():
            if not p.requires_grad:
                continue
            rms = float(p.float().pow(2).mean().sqrt()) if p.numel() else 0.0
            scale = 0.5 * rms if rms > 0 else 0.5 / math.sqrt(p.shape[-1])
            p.add_((torch.randn(p.shape, generator=g) * scale).to(p))


def _base_weight(layer: nn.Module) -> Tensor:
    """A base layer's ``d_out × d_in`` weight (an NF4 layer's dequantised one)."""
    if hasattr(layer, "dequantized_weight"):
        return layer.dequantized_weight()
    return layer.weight


def _layer_hosts(model: nn.Module) -> list[AdaptedLayer]:
    return [h for _, h in hosts(model)]


def _bits(t: Tensor) -> Tensor:
    """Bit patterns, so -0.0 vs 0.0 and NaN payloads count as differences."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
    return t.detach().contiguous().view(ints[t.element_size()])


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".adapters." not in k}


def _assert_bitwise(before: dict[str, Tensor], model: nn.Module, what: str) -> None:
    after = model.state_dict()
    for k, v in before.items():
        w = after[k]
        assert w.dtype == v.dtype and w.shape == v.shape, f"{what}: {k} changed dtype/shape"
        diff = int((_bits(w) != _bits(v)).sum())
        assert diff == 0, (
            f"{what}: {k} differs from the original in {diff} of {v.numel()} elements "
            f"(max |Δ| = {float((w.double() - v.double()).abs().max()):.3g})"
        )


def _lowranks(host: AdaptedLayer, names: Sequence[str]) -> list[LowRank]:
    w = host.weight.detach()
    return [host.adapters[n].lowrank(w) for n in names]


def _check_close(
    got: Tensor,
    ref: Tensor,
    x: Tensor,
    host: AdaptedLayer,
    lowranks: Sequence[LowRank],
    what: str,
    weight: Tensor | None = None,
) -> float:
    """Assert ``|got − ref| ≤ τ`` elementwise; returns the largest ``|Δ| / (u_s·M)``.

    ``weight`` is the base weight the magnitudes are computed from: pass the pre-merge weight
    when the host is merged (the merged weight holds ``c ⊙ W``, not ``W``)."""
    weight = host.weight if weight is None else weight
    dtype = weight.dtype
    tau = merge_tolerance(x, weight, host.bias, lowranks, dtype)
    diff = (got.double() - ref.double()).abs()
    bad = diff > tau
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {diff.numel()} outputs outside tolerance; worst |Δ| = "
        f"{float(diff.max()):.3g}, τ there = {float(tau.flatten()[int(diff.flatten().argmax())]):.3g}"
    )
    m = magnitude(x, weight, host.bias, lowranks)
    ratio = diff / (unit_roundoff(dtype) * m).clamp_min(1e-300)
    return float(ratio.max()) if ratio.numel() else 0.0


def _record(table: dict[str, float], key: str, value: float) -> None:
    table[key] = max(table.get(key, 0.0), value)


# ------------------------------------------------------------------------------------------
# The checks (docs/spec/variants.md §12)
# ------------------------------------------------------------------------------------------


def check_init_identity(variant: str, case: Case) -> None:
    """1. Right after injection the output equals the base output: bit for bit when the variant
    declares ``exact_at_init``, otherwise within τ."""
    model, xs = build(case, variant)
    model.eval()
    with torch.no_grad():
        base = model(xs)
    adapt(model, variant, case)
    model.eval()
    with torch.no_grad():
        out = model(xs)
    exact = lorazoo.variant(variant).exact_at_init
    for i, (y, y0, host) in enumerate(zip(out, base, _layer_hosts(model), strict=True)):
        if exact:
            n = int((_bits(y) != _bits(y0)).sum())
            assert n == 0, f"layer {i}: {n} outputs differ from the base at initialisation"
        else:
            _check_close(y, y0, xs[i], host, _lowranks(host, host.active), f"layer {i} at init")


def check_perturbed_differs(variant: str, case: Case) -> None:
    """2. After perturbing the adapter tensors the output differs from the base (guards against
    checks that pass vacuously)."""
    model, xs = build(case, variant)
    model.eval()
    with torch.no_grad():
        base = model(xs)
    originals = [_base_weight(layer).detach().clone() for layer in model.layers]
    adapt(model, variant, case)
    perturb(model, case.seed)
    model.eval()
    with torch.no_grad():
        out = model(xs)
    for i, (y, y0, h) in enumerate(zip(out, base, _layer_hosts(model), strict=True)):
        if float((y.double() - y0.double()).abs().max()) > 0:
            continue
        # No output moved. That is legitimate only when the adapter's effect is non-zero but
        # smaller than the rounding of the output it is added to (|Δy| ≤ half an ulp ≤ u_s·|y|,
        # doubled for the rounding of the effect itself), e.g. VeRA's frozen projection of a
        # 1-input layer is one fixed, possibly tiny, number that perturbing cannot enlarge.
        delta = _exact_effect(xs[i], h, originals[i])
        assert float(delta.abs().max()) > 0, f"layer {i}: adapter has no effect"
        u_s = unit_roundoff(case.dtype)
        eta = RHO * smallest_subnormal(case.dtype)
        hidden = delta.abs() <= 2 * u_s * y0.double().abs() + eta
        assert bool(hidden.all()), (
            f"layer {i}: the adapter's effect (up to {float(delta.abs().max()):.3g}) is larger than "
            "the output's rounding, yet no output differs from the base"
        )


def _exact_effect(x: Tensor, host: AdaptedLayer, original: Tensor) -> Tensor:
    """How far the adapted layer's output moves from the original base's, in fp64: the active
    adapters' ``ΔW x`` (from their low-rank form) plus any rewrite of the base (OLoRA)."""
    w = host.weight.detach().double()
    x64 = x.detach().double()
    out = x64 @ (w - original.double()).T
    for lr in _lowranks(host, host.active):
        low = (x64 @ lr.A.detach().double().T) @ lr.B.detach().double().T * float(lr.scale)
        if lr.row_scale is None:
            out += low
        else:
            c = lr.row_scale.detach().double()
            out += (c - 1) * (x64 @ w.T) + c * low
    return out


def _adapter_magnitude(x: Tensor, host: AdaptedLayer) -> Tensor:
    """``Σ_a |c_a|·|s_a|·|B_a|·|A_a|·|x| + |c_a − 1|·|W|·|x|`` in fp64: a bound on what the active
    adapters can add to the output for input ``x``."""
    ax = x.detach().double().abs()
    wx = ax @ host.weight.detach().double().abs().T
    out = torch.zeros_like(wx)
    for lr in _lowranks(host, host.active):
        low = (ax @ lr.A.detach().double().abs().T) @ lr.B.detach().double().abs().T * abs(float(lr.scale))
        if lr.row_scale is None:
            out += low
        else:
            c = lr.row_scale.detach().double()
            out += c.abs() * low + (c - 1).abs() * wx
    return out


def check_merge_equivalence(variant: str, case: Case) -> float:
    """3. In eval mode the merged output equals the unmerged output within τ."""
    model, xs = build(case, variant)
    adapt(model, variant, case)
    perturb(model, case.seed)
    model.eval()
    hs = _layer_hosts(model)
    lowranks = [_lowranks(h, h.active) for h in hs]
    weights = [h.weight.detach().clone() for h in hs]
    with torch.no_grad():
        unmerged = model(xs)
        lorazoo.merge(model)
        merged = model(xs)
    worst = 0.0
    for i, (ym, yu, h) in enumerate(zip(merged, unmerged, hs, strict=True)):
        what = f"layer {i} merged vs unmerged"
        worst = max(worst, _check_close(ym, yu, xs[i], h, lowranks[i], what, weights[i]))
    _record(STATS, str(case.dtype).replace("torch.", ""), worst)
    return worst


def _wide_bound(host: AdaptedLayer, lowranks: Sequence[LowRank], weight: Tensor) -> int:
    """How many elements may legitimately need a full bit pattern to unmerge exactly: those
    whose rounding error through merge and undo can exceed 127 units in the last place of the
    original (the original is tiny next to its update, or zero)."""
    w = weight.double()
    g = torch.ones(w.shape[0], dtype=torch.float64, device=w.device)
    d = torch.zeros_like(w)
    for lr in lowranks:
        c = lr.row_scale.double() if lr.row_scale is not None else torch.ones_like(g)
        d += (c * float(lr.scale)).unsqueeze(1) * (lr.B.double() @ lr.A.double())
        g += c - 1
    u_s = unit_roundoff(weight.dtype)
    u_a = unit_roundoff(acc_dtype(weight.dtype))
    ag = g.abs().unsqueeze(1)
    err = (u_s + 4 * u_a) * (ag * w.abs() + d.abs()) / ag + (u_s + 2 * u_a) * w.abs()
    err = err * 1.01
    tiny = torch.finfo(weight.dtype).smallest_normal * 2
    may = (w.abs() < tiny) | (err >= w.abs() / 2) | (2 * err / (u_s * w.abs().clamp_min(tiny)) + 1 > 127)
    return int(may.sum())


def check_unmerge_exact(variant: str, case: Case) -> float:
    """4. merge → unmerge restores the base weights bit for bit, holding at most one byte per
    element plus a full bit pattern for each element whose bits the merge cannot keep."""
    model, xs = build(case, variant)
    adapt(model, variant, case)
    perturb(model, case.seed)
    model.eval()
    before = _snapshot(model)
    hs = _layer_hosts(model)
    bounds = [_wide_bound(h, _lowranks(h, h.active), h.weight.detach()) for h in hs]
    lorazoo.merge(model)
    worst = 0.0
    for h, bound in zip(hs, bounds, strict=True):
        res = h.merged.residual
        numel = h.weight.numel()
        dense = res.dense.numel() if res.dense is not None else 0
        assert dense <= numel, "dense residual larger than one byte per element"
        per_wide = res.wide_index.element_size() + res.wide_bits.element_size()
        sparse = res.nbytes - dense - res.n_wide * per_wide
        assert dense + sparse <= numel, f"residual holds {dense + sparse} bytes for {numel} elements"
        assert res.n_wide <= bound, f"{res.n_wide} wide elements, but at most {bound} can need it"
        worst = max(worst, (res.nbytes - res.n_wide * per_wide) / numel)
    _record(MERGE_BYTES, str(case.dtype).replace("torch.", ""), worst)
    lorazoo.unmerge(model)
    _assert_bitwise(before, model, "merge → unmerge")
    with torch.no_grad():
        for i, h in enumerate(hs):
            assert h.merged is None, f"layer {i} still reports merged adapters"
    return worst


def check_eject_exact(variant: str, case: Case, merge_first: bool = True) -> None:
    """5. merge → eject (or eject alone) gives back the original module objects and weights bit
    for bit, with their ``requires_grad`` flags."""
    model, xs = build(case, variant)
    originals = list(model.layers)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = _snapshot(model)
    adapt(model, variant, case)
    perturb(model, case.seed)
    model.eval()
    if merge_first:
        lorazoo.merge(model)
    lorazoo.eject(model)
    for i, (m, orig) in enumerate(zip(model.layers, originals, strict=True)):
        assert m is orig, f"layer {i}: eject did not restore the original module object"
    _assert_bitwise(before, model, "merge → eject" if merge_first else "eject")
    for n, p in model.named_parameters():
        assert p.requires_grad == flags[n], f"{n}: requires_grad not restored"


def check_multi_adapter(variant: str, case: Case, other: str = "lora") -> None:
    """6. Two adapters on one layer (this variant and ``other``): merged in one step equals the
    unmerged sum within τ, and unmerge restores the base bit for bit."""
    model, xs = build(case, variant)
    adapt(model, variant, case, name="first")
    adapt(model, other, case, name="second")
    perturb(model, case.seed)
    model.eval()
    before = _snapshot(model)
    hs = _layer_hosts(model)
    lowranks = [_lowranks(h, ("first", "second")) for h in hs]
    weights = [h.weight.detach().clone() for h in hs]
    with torch.no_grad():
        unmerged = model(xs)
        lorazoo.merge(model)
        merged = model(xs)
    for i, (ym, yu, h) in enumerate(zip(merged, unmerged, hs, strict=True)):
        what = f"layer {i}: two adapters merged vs unmerged"
        _check_close(ym, yu, xs[i], h, lowranks[i], what, weights[i])
    lorazoo.unmerge(model)
    _assert_bitwise(before, model, "two adapters: merge → unmerge")
    with torch.no_grad():
        again = model(xs)
    for i, (ya, yu) in enumerate(zip(again, unmerged, strict=True)):
        assert torch.equal(_bits(ya), _bits(yu)), f"layer {i}: output after unmerge differs"


def check_roundtrip(variant: str, case: Case) -> None:
    """7. save → load onto a fresh copy of the base is bit-exact: tensors and forward."""
    model, xs = build(case, variant)
    fresh = copy.deepcopy(model)
    adapt(model, variant, case)
    perturb(model, case.seed)
    model.eval()
    with torch.no_grad():
        out = model(xs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter.safetensors"
        lorazoo.save(model, path)
        lorazoo.load(fresh, path)
    fresh.eval()
    for (p1, n1, a1), (p2, n2, a2) in zip(iter_adapters(model), iter_adapters(fresh), strict=True):
        assert (p1, n1) == (p2, n2)
        s1, s2 = a1.state_dict(), a2.state_dict()
        assert s1.keys() == s2.keys(), f"{p1}: tensor names differ after load"
        for k in s1:
            assert s1[k].dtype == s2[k].dtype and torch.equal(_bits(s1[k]), _bits(s2[k])), f"{p1}.{k}"
    with torch.no_grad():
        again = fresh(xs)
    for i, (y1, y2) in enumerate(zip(out, again, strict=True)):
        assert torch.equal(_bits(y1), _bits(y2)), f"layer {i}: forward differs after save → load"


def check_param_count(variant: str, case: Case) -> None:
    """8. ``lorazoo.trainable`` equals the variant's formula summed over layers."""
    model, _ = build(case, variant)
    total = sum(p.numel() for p in model.parameters())
    adapt(model, variant, case)
    cls = lorazoo.variant(variant)
    cfg = next(iter_adapters(model))[2].config
    expected = sum(cls.num_trainable(i, o, cfg) for i, o, _ in case.shapes)
    count = lorazoo.trainable(model)
    assert count.trainable == expected, f"trainable {count.trainable}, formula says {expected}"
    extra = count.total - total - expected
    assert extra <= 0, (
        f"total must count base and trainable adapter tensors once: lorazoo.trainable counts "
        f"{count.total} parameters, {extra} more than the base's {total} plus the formula's {expected}: "
        "adapter nn.Parameters that do not train. Hold frozen adapter tensors (a fixed projection, "
        "a frozen factor) as buffers: self.register_buffer(name, tensor), with persistent=False when "
        "they are regenerated rather than saved, not as nn.Parameter(..., requires_grad=False)"
    )
    assert extra == 0, (
        f"total must count base and trainable adapter tensors once: lorazoo.trainable counts "
        f"{count.total} parameters, {-extra} fewer than the base's {total} plus the formula's {expected}: "
        "the base layer's own weight and bias must stay registered on the host"
    )


def check_dropout(variant: str, case: Case) -> None:
    """9. With dropout, two train-mode forwards differ; in eval mode merged equals unmerged."""
    model, xs = build(case, variant)
    adapt(model, variant, case, dropout=0.5)
    perturb(model, case.seed)
    model.train()
    big = [x.repeat_interleave(16, dim=-2) for x in xs]
    with torch.no_grad():
        torch.manual_seed(case.seed)
        a = model(big)
        b = model(big)
    if not any(not torch.equal(_bits(p), _bits(q)) for p, q in zip(a, b, strict=True)):
        # Legitimate only if every adapter contribution, even with survivors scaled by
        # 1/(1 − p), is below the rounding of the output it is added to (as in
        # check_perturbed_differs: VeRA's fixed projection of a 1-input layer can be tiny).
        u_s = unit_roundoff(case.dtype)
        eta = RHO * smallest_subnormal(case.dtype)
        for i, (x, y, h) in enumerate(zip(big, a, _layer_hosts(model), strict=True)):
            bound = _adapter_magnitude(x, h) / (1 - 0.5)
            assert bool((bound <= 2 * u_s * y.double().abs() + eta).all()), (
                f"dropout > 0 in train mode: two forwards should differ (layer {i}'s adapter "
                f"contributes up to {float(bound.max()):.3g}, above the output's rounding)"
            )
    model.eval()
    hs = _layer_hosts(model)
    lowranks = [_lowranks(h, h.active) for h in hs]
    weights = [h.weight.detach().clone() for h in hs]
    with torch.no_grad():
        u = model(xs)
        lorazoo.merge(model)
        m = model(xs)
    for i, (ym, yu, h) in enumerate(zip(m, u, hs, strict=True)):
        what = f"layer {i}: eval with dropout, merged vs unmerged"
        _check_close(ym, yu, xs[i], h, lowranks[i], what, weights[i])


def check_delta_consistency(variant: str, case: Case) -> None:
    """10. ``delta_weight`` agrees with the forward: in fp64, the unmerged contribution on the
    unit vectors ``e_j`` is column ``j`` of ``ΔW`` (an independent path through the variant's
    forward), within the fp64 tolerance."""
    c64 = case.with_(dtype=torch.float64)
    model, _ = build(c64, variant)
    adapt(model, variant, c64)
    perturb(model, case.seed)
    model.eval()
    for i, h in enumerate(_layer_hosts(model)):
        eye = torch.eye(h.in_features, dtype=torch.float64, device=h.weight.device)
        with torch.no_grad():
            base = torch.nn.functional.linear(eye, h.weight, h.bias)
            contrib = sum(a(eye, base, h) for a in (h.adapters[n] for n in h.active))
            delta = sum(h.adapters[n].delta_weight(h.weight) for n in h.active)
        lowranks = _lowranks(h, h.active)
        # the base output fed to the forward includes the bias, and so does its rounding
        tau = merge_tolerance(eye, h.weight, h.bias, lowranks, torch.float64)
        diff = (contrib - delta.T).abs()
        assert bool((diff <= tau).all()), (
            f"layer {i}: forward contribution and delta_weight disagree by {float(diff.max()):.3g}"
        )
        assert float(delta.abs().max()) > 0, f"layer {i}: ΔW is zero after perturbation"


def check_gradients(variant: str, case: Case) -> None:
    """11. Only adapter tensors receive gradients, and ``param_groups`` partitions exactly the
    trainable tensors."""
    model, xs = build(case, variant)
    adapt(model, variant, case)
    perturb(model, case.seed)
    model.train()
    loss = sum(y.float().pow(2).sum() for y in model(xs))
    loss.backward()
    adapter_params = {id(p) for _, _, a in iter_adapters(model) for p in a.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable, "nothing is trainable after injection"
    for n, p in model.named_parameters():
        if id(p) in adapter_params and p.requires_grad:
            assert p.grad is not None, f"{n}: trainable adapter tensor got no gradient"
        else:
            assert p.grad is None, f"{n}: frozen tensor received a gradient"
            assert not p.requires_grad, f"{n}: base tensor left trainable"
    for b in model.buffers():
        assert not b.requires_grad
    seen: dict[int, int] = {}
    for g in lorazoo.param_groups(model, lr=1e-3):
        for p in g["params"]:
            seen[id(p)] = seen.get(id(p), 0) + 1
    assert set(seen) == {id(p) for p in trainable}, (
        "param_groups does not cover exactly the trainable tensors"
    )
    assert all(v == 1 for v in seen.values()), "a tensor appears in two optimizer groups"


class Tables(nn.Module):
    """Independent embedding tables, one per case shape ``(d_in, d_out, _)``: ``d_in`` entries of
    ``d_out`` features (the one-hot linear map's shape); ``forward(ids)`` looks ``ids[i]`` up in
    table i."""

    def __init__(self, shapes: Sequence[tuple[int, int, bool]], dtype: torch.dtype):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(i, o, dtype=dtype) for i, o, _ in shapes)

    def forward(self, ids: Sequence[Tensor]) -> list[Tensor]:
        return [table(t) for table, t in zip(self.tables, ids, strict=True)]


class KindLayers(nn.Module):
    """Independent layers of one layer kind, built by the kind's ``example`` for each case shape
    ``(d_in, d_out, bias)``; ``forward(xs)`` applies layer i to ``xs[i]``."""

    def __init__(self, kind: LayerKind, shapes: Sequence[tuple[int, int, bool]], dtype: torch.dtype):
        super().__init__()
        self.layers = nn.ModuleList(kind.example(i, o, b, dtype) for i, o, b in shapes)

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        return [layer(x) for layer, x in zip(self.layers, xs, strict=True)]


def _kind_inputs(kind: LayerKind, model: KindLayers, case: Case) -> list[Tensor]:
    g = torch.Generator().manual_seed(case.seed + 1)
    out = []
    for m in model.layers:
        x = kind.example_input(m, case.batch, g)
        out.append((x.to(case.dtype) if x.is_floating_point() else x).to(case.device))
    return out


def check_kind(variant: str, case: Case, kind: LayerKind | str) -> None:
    """12. One layer kind (every registered kind runs it; ``nn.Linear`` is also what every other
    check uses). A variant that adapts the kind (its ``layer_kinds`` hold the kind's
    ``adapts_as``): output at injection equal to the base (bit for bit with ``exact_at_init``),
    each layer's unmerged output within τ of the reference ``x·(W + ΔW)ᵀ + b`` computed from the
    kind's ``d_out × d_in`` weight view (the bound of the linear map the layer is: one-hot rows
    for an embedding, input patches for a convolution; outputs compared as the kind's
    ``dense_output`` rows), merged within τ of unmerged, merge → unmerge and merge → eject bit-exact
    (eject puts the original modules back), save → load bit-exact. Any other variant (one that
    does not adapt the kind, asks for a base storage the kind does not have, or rewrites the
    base of a kind that refuses base rewrites): injection is refused with a ``ConfigError`` and
    the model unchanged."""
    if isinstance(kind, str):
        kind = registry.layer_kind_named(kind)
    torch.manual_seed(case.seed)
    model = KindLayers(kind, case.shapes, case.dtype).to(case.device)
    xs = _kind_inputs(kind, model, case)
    originals = list(model.layers)
    fresh = copy.deepcopy(model)
    before = _snapshot(model)
    cls = lorazoo.variant(variant)
    hyper = {"r": case.r, "alpha": case.alpha, **cls.example_config, **case.extra}
    originals_ids = {id(m) for m in originals}

    def targets(path: str, m: nn.Module) -> bool:
        return id(m) in originals_ids or (isinstance(m, AdaptedLayer) and m.kind is kind)

    what = f"{kind.name} layers"
    storage = getattr(cls, "base_storage", None)
    refused = (
        kind.adapts_as not in cls.layer_kinds
        # a variant that asks for a base storage this kind does not have (and cannot be given)
        or (storage is not None and kind.storage != storage)
        # a variant that rewrites the base, on a kind whose storage cannot hold a rewrite
        or (cls.prepare_base is not Variant.prepare_base and not kind.host_class.base_rewrites)
    )
    if refused:
        try:
            lorazoo.inject(model, variant, targets=targets, **hyper)
        except lorazoo.ConfigError:
            _assert_bitwise(before, model, f"refused injection into {what}")
            assert all(m is o for m, o in zip(model.layers, originals, strict=True)), "a layer was replaced"
            return
        raise AssertionError(f"{variant!r} cannot adapt {what} (see check_kind), yet adapted them")
    model.eval()

    def run(m: nn.Module) -> list[Tensor]:  # each output as the rows dense_input's rows map to
        return [kind.dense_output(o, y) for o, y in zip(originals, m(xs), strict=True)]

    with torch.no_grad():
        base = run(model)
        lorazoo.inject(model, variant, targets=targets, **hyper)
        at_init = run(model)
    hs = _layer_hosts(model)
    assert len(hs) == len(originals) and all(h.kind is kind for h in hs), f"{what} not wrapped by their kind"
    injected = _snapshot(model)  # a variant may rewrite the base (OLoRA) until eject

    def tolerance(i: int, view: Tensor, bias: Tensor | None) -> Tensor:
        xd = kind.dense_input(originals[i], xs[i]).to(view.dtype)
        lrs = [hs[i].adapters[n].lowrank(view) for n in hs[i].active]
        return merge_tolerance(xd, view, bias, lrs, view.dtype)

    for i, (y, y0) in enumerate(zip(at_init, base, strict=True)):
        if cls.exact_at_init:
            assert torch.equal(_bits(y), _bits(y0)), f"{what} {i}: output differs from the base at init"
        else:
            tau = tolerance(i, hs[i].weight_view().detach(), hs[i].bias)
            assert bool(((y.double() - y0.double()).abs() <= tau).all()), f"{what} {i} at init"
    perturb(model, case.seed)
    views = [h.weight_view().detach().clone() for h in hs]
    with torch.no_grad():
        unmerged = run(model)
        for i, (y, y0) in enumerate(zip(unmerged, base, strict=True)):
            if not torch.equal(y, y0):
                continue
            # As in check 2: legitimate only for an effect hidden by the output's rounding.
            w64 = views[i].double()
            delta = (
                kind.dense_input(originals[i], xs[i]).double()
                @ sum(hs[i].adapters[n].delta_weight(w64) for n in hs[i].active).t()
            )
            assert float(delta.abs().max()) > 0, f"{what} {i}: perturbed adapter has no effect"
            u_s = unit_roundoff(case.dtype)
            eta = RHO * smallest_subnormal(case.dtype)
            assert bool((delta.abs() <= 2 * u_s * y0.double().abs() + eta).all()), (
                f"{what} {i}: the adapter's effect (up to {float(delta.abs().max()):.3g}) is larger "
                "than the output's rounding, yet no output differs from the base"
            )
        for i, h in enumerate(hs):
            view = views[i].to(acc_dtype(views[i].dtype))
            w_merged = view + sum(h.adapters[n].delta_weight(views[i]) for n in h.active)
            xd = kind.dense_input(originals[i], xs[i]).to(view.dtype)
            ref = xd @ w_merged.t()
            if h.bias is not None:
                ref = ref + h.bias.to(ref.dtype)
            diff = (unmerged[i].double() - ref.double()).abs()
            tau = tolerance(i, views[i], h.bias)
            assert bool((diff <= tau).all()), (
                f"{what} {i} unmerged vs x·(W + ΔW)ᵀ + b: worst |Δ| = {float(diff.max()):.3g}, "
                f"τ there = {float(tau.flatten()[int(diff.flatten().argmax())]):.3g}"
            )
        lorazoo.merge(model)
        merged = run(model)
    for i, (ym, yu) in enumerate(zip(merged, unmerged, strict=True)):
        diff = (ym.double() - yu.double()).abs()
        tau = tolerance(i, views[i], hs[i].bias)
        assert bool((diff <= tau).all()), (
            f"{what} {i} merged vs unmerged: worst |Δ| = {float(diff.max()):.3g}, "
            f"τ there = {float(tau.flatten()[int(diff.flatten().argmax())]):.3g}"
        )
    lorazoo.unmerge(model)
    _assert_bitwise(injected, model, f"{what}: merge → unmerge")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter.safetensors"
        lorazoo.save(model, path)
        lorazoo.load(fresh, path)
    fresh.eval()
    with torch.no_grad():
        for i, (y1, y2) in enumerate(zip(unmerged, run(fresh), strict=True)):
            assert torch.equal(_bits(y1), _bits(y2)), f"{what} {i}: forward differs after save → load"
    lorazoo.merge(model)
    lorazoo.eject(model)
    assert all(m is o for m, o in zip(model.layers, originals, strict=True)), (
        f"eject did not restore the {what}"
    )
    _assert_bitwise(before, model, f"{what}: merge → eject")


def check_kinds(variant: str, case: Case) -> None:
    """:func:`check_kind` for every registered layer kind except ``"linear"`` (which every other
    check exercises); a kind whose example needs a package that is not installed is skipped."""
    for kind in registry.layer_kinds():
        if kind.name == "linear":
            continue
        try:
            kind.example(2, 2, True, torch.float32)
        except ImportError:
            continue
        check_kind(variant, case, kind)


def check_routing(variant: str, case: Case) -> None:
    """13. A mixed batch (:func:`lorazoo.route`): each row, routed to this variant, to LoRA or to
    the base, equals that row of the model run with only its adapter active within τ (base
    rows bit for bit); the active set and the outputs after the block are as before it."""
    model, xs = build(case, variant)
    adapt(model, variant, case, name="first")
    adapt(model, "lora", case, name="second")
    perturb(model, case.seed)
    model.eval()
    n = case.batch[0]
    names = [("first", "second", None)[i % 3] for i in range(n)]
    hs = _layer_hosts(model)
    with torch.no_grad():
        before = model(xs)
        refs: dict[str | None, list[Tensor]] = {}
        for name in set(names):
            if name is None:
                with lorazoo.disabled(model):
                    refs[name] = model(xs)
            else:
                lorazoo.set_active(model, [name])
                refs[name] = model(xs)
        lorazoo.set_active(model, ["first", "second"])
        with lorazoo.route(model, names):
            routed = model(xs)
        after = model(xs)
    for i, h in enumerate(hs):
        for row, name in enumerate(names):
            got, ref = routed[i][row], refs[name][i][row]
            if name is None:
                assert torch.equal(_bits(got), _bits(ref)), f"layer {i} row {row}: a base row changed"
            else:
                what = f"layer {i} row {row} routed to {name!r}"
                _check_close(got, ref, xs[i][row], h, _lowranks(h, [name]), what)
        assert h.active == ("first", "second"), f"layer {i}: routing changed the active adapters"
        assert torch.equal(_bits(after[i]), _bits(before[i])), f"layer {i}: output changed after the block"


CHECKS: dict[str, Callable[[str, Case], Any]] = {
    "init_identity": check_init_identity,
    "perturbed_differs": check_perturbed_differs,
    "merge_equivalence": check_merge_equivalence,
    "unmerge_exact": check_unmerge_exact,
    "eject_exact": check_eject_exact,
    "multi_adapter": check_multi_adapter,
    "roundtrip": check_roundtrip,
    "param_count": check_param_count,
    "dropout": check_dropout,
    "delta_consistency": check_delta_consistency,
    "gradients": check_gradients,
    "kinds": check_kinds,
    "routing": check_routing,
}

# dtypes each check draws from (docs/spec/variants.md §12: unmerge is bit-exact in fp32, bf16 and fp16).
CHECK_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "unmerge_exact": (torch.float32, torch.bfloat16, torch.float16),
    "eject_exact": (torch.float32, torch.bfloat16, torch.float16),
    "merge_equivalence": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
    "kinds": (torch.float32, torch.bfloat16, torch.float16),
}


def run_conformance(
    variant: str,
    max_examples: int = 25,
    checks: Sequence[str] | None = None,
    device: str = "cpu",
    **case_extra: Any,
) -> None:
    """Run every check (or ``checks``) on ``variant`` under hypothesis.

    A third-party plugin's test suite can call this directly::

        def test_my_variant_conforms():
            lorazoo.testing.run_conformance("my_variant")
    """
    lorazoo.variant(variant)  # a clear error for an unknown name
    for name in checks or CHECKS:
        _property(variant, CHECKS[name], name, max_examples, device, case_extra)()


def run_kind_conformance(
    kind: str,
    variants: Sequence[str] | None = None,
    max_examples: int = 25,
    device: str = "cpu",
) -> None:
    """Run :func:`check_kind` for the registered layer kind ``kind`` with every registered
    variant (or ``variants``) under hypothesis. A third-party layer kind's test suite calls::

        def test_my_kind_conforms():
            lorazoo.testing.run_kind_conformance("my_kind")
    """
    layer_kind = registry.layer_kind_named(kind)
    for variant in variants or lorazoo.variants():
        lorazoo.variant(variant)
        _kind_property(variant, layer_kind, max_examples, device)()


def _kind_property(variant: str, kind: LayerKind, max_examples: int, device: str) -> Callable[[], None]:
    strategy = cases(dtypes=CHECK_DTYPES["kinds"]).map(lambda c: c.with_(device=device))

    @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def prop(case: Case) -> None:
        check_kind(variant, case, kind)

    return prop


def _property(
    variant: str,
    fn: Callable[[str, Case], Any],
    name: str,
    max_examples: int,
    device: str,
    case_extra: dict[str, Any],
) -> Callable[[], None]:
    strategy = cases(dtypes=CHECK_DTYPES.get(name, (torch.float32, torch.bfloat16)))
    strategy = strategy.map(lambda c: c.with_(device=device, extra=dict(case_extra)))

    @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def prop(case: Case) -> None:
        fn(variant, case)

    return prop


__all__ = [
    "CHECKS",
    "CHECK_DTYPES",
    "Case",
    "Layers",
    "STATS",
    "KindLayers",
    "Tables",
    "check_kind",
    "run_kind_conformance",
    "MERGE_BYTES",
    "accumulation_roundoff",
    "adapt",
    "build",
    "cases",
    "perturb",
    "run_conformance",
]
