"""OLoRA (docs/spec/variants.md §7): the QR initialisation, the reversible base rewrite, loading, export."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lorazoo_plugins.olora import OLoRA, qr_factors, to_lora
from torch import nn

import lorazoo
from lorazoo.engine.inject import hosts
from lorazoo.testing import accumulation_roundoff, merge_tolerance, unit_roundoff

U32 = unit_roundoff(torch.float32)


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}
    return t.detach().contiguous().view(ints[t.element_size()])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


@st.composite
def setups(draw, dtypes=(torch.float32, torch.bfloat16), rank_factor: int = 1):
    d_in = draw(st.integers(rank_factor, 48))
    d_out = draw(st.integers(rank_factor, 48))
    return {
        "d_in": d_in,
        "d_out": d_out,
        "r": draw(st.integers(1, min(d_in, d_out, 16 * rank_factor) // rank_factor)),
        "alpha": draw(st.sampled_from([0.5, 1.0, 4.0, 16.0])),
        "rslora": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "dtype": draw(st.sampled_from(list(dtypes))),
        "seed": draw(st.integers(0, 2**16)),
    }


def _model(s: dict) -> nn.Linear:
    torch.manual_seed(s["seed"])
    return nn.Linear(s["d_in"], s["d_out"], bias=s["bias"], dtype=s["dtype"])


def _inject(layer: nn.Module, s: dict, name: str = "default") -> nn.Module:
    model = nn.Sequential(layer) if isinstance(layer, nn.Linear) else layer
    return lorazoo.inject(
        model, "olora", targets=[nn.Linear], name=name, r=s["r"], alpha=s["alpha"], rslora=s["rslora"]
    )


def _x(s: dict, rows: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(s["seed"] + 1)
    return torch.randn(rows, s["d_in"], generator=g).clamp(-4, 4).to(s["dtype"])


@given(s=setups())
def test_qr_factors_are_orthonormal_and_triangular(s: dict) -> None:
    """Invariant 2: ‖B₀ᵀB₀ − I‖_max ≤ 4·d_out·u₃₂ and A₀[:, :r] is upper triangular."""
    layer = _model(s)
    model = _inject(layer, s)
    adapter = model[0].adapters["default"]
    B0, A0 = adapter.initial_factors
    r = s["r"]
    gram = B0.double().T @ B0.double()
    err = float((gram - torch.eye(r, dtype=torch.float64)).abs().max())
    assert err <= 4 * s["d_out"] * U32, f"B₀ columns not orthonormal: {err:.3g}"
    lead = A0[:, :r]
    assert torch.equal(lead, torch.triu(lead)), "A₀[:, :r] has entries below the diagonal"
    # the adapter starts at the factors
    assert torch.equal(adapter.lora_A, A0) and torch.equal(adapter.lora_B, B0)


@given(s=setups())
def test_rewrite_reconstructs_w_and_is_reproducible(s: dict) -> None:
    """Invariants 3 and 5: W_res + s·B₀A₀ == W within 2u(|W| + s|B₀||A₀|) elementwise, plus the
    rounding of the r-term dot products that form B₀A₀ in the accumulation dtype, γ_r(u_a)·s|B₀||A₀|
    (§11.2's γ_K; docs/spec/variants.md §7 has it; without it fp32 fails for r ≳ 4: the rewrite is
    cast(W + (−s·B₀)·A₀) with the product summed in fp32, so its error is u|W_res| +
    (u + γ_r)·s|B₀||A₀| ≤ u|W| + (2u + γ_r)·s|B₀||A₀|). Running the initialisation again on the
    same W gives W_res bit for bit."""
    layer = _model(s)
    w = layer.weight.detach().clone()
    twin = copy.deepcopy(layer)
    model = _inject(layer, s)
    host = model[0]
    adapter = host.adapters["default"]
    B0, A0 = (t.double() for t in adapter.initial_factors)
    scale = adapter.scale
    assert scale == (s["alpha"] / math.sqrt(s["r"]) if s["rslora"] else s["alpha"] / s["r"])
    w_res = host.weight.detach().double()
    recon = w_res + scale * (B0 @ A0)
    prod = scale * (B0.abs() @ A0.abs())
    u_a = accumulation_roundoff(s["dtype"])
    gamma = s["r"] * u_a / (1 - s["r"] * u_a)
    bound = 2 * unit_roundoff(s["dtype"]) * (w.double().abs() + prod) + gamma * prod
    diff = (recon - w.double()).abs()
    assert bool((diff <= bound).all()), (
        f"W_res + s·B₀A₀ off W by {float((diff - bound).max()):.3g} over the bound"
    )
    again = _inject(twin, s)
    assert _same_bits(again[0].weight, host.weight), "re-running the init does not reproduce W_res"


@given(s=setups(dtypes=(torch.float64, torch.float32, torch.bfloat16)))
def test_init_identity_within_tolerance(s: dict) -> None:
    """Invariant 1, OLoRA's weaker init identity: equal to the base output within τ (§11.2)."""
    layer = _model(s)
    x = _x(s)
    with torch.no_grad():
        y0 = layer(x)
    model = _inject(layer, s).eval()
    host = model[0]
    with torch.no_grad():
        y = model(x)
    lowrank = host.adapters["default"].lowrank()
    tau = merge_tolerance(x, host.weight, host.bias, [lowrank], s["dtype"])
    diff = (y.double() - y0.double()).abs()
    assert bool((diff <= tau).all()), f"init output off the base by {float(diff.max()):.3g}"


@given(s=setups(dtypes=(torch.float32, torch.bfloat16, torch.float16)))
def test_merge_unmerge_eject_after_perturbation(s: dict) -> None:
    """Invariant 4: merged ≈ unmerged within τ; unmerge restores W_res bit for bit; eject (after a
    merge) restores the original W bit for bit."""
    layer = _model(s)
    w = layer.weight.detach().clone()
    model = _inject(layer, s).eval()
    host = model[0]
    adapter = host.adapters["default"]
    g = torch.Generator().manual_seed(s["seed"] + 2)
    with torch.no_grad():
        adapter.lora_A.add_(torch.randn(adapter.lora_A.shape, generator=g).to(adapter.lora_A) * 0.5)
        adapter.lora_B.add_(torch.randn(adapter.lora_B.shape, generator=g).to(adapter.lora_B) * 0.5)
    w_res = host.weight.detach().clone()
    x = _x(s)
    lowrank = adapter.lowrank()
    with torch.no_grad():
        unmerged = model(x)
        lorazoo.merge(model)
        merged = model(x)
    tau = merge_tolerance(x, w_res, host.bias, [lowrank], s["dtype"])
    diff = (merged.double() - unmerged.double()).abs()
    assert bool((diff <= tau).all()), f"merged vs unmerged: {float(diff.max()):.3g}"
    lorazoo.unmerge(model)
    assert _same_bits(host.weight, w_res), "unmerge did not restore W_res"
    lorazoo.merge(model)
    lorazoo.eject(model)
    assert isinstance(model[0], nn.Linear) and model[0] is layer
    assert _same_bits(layer.weight, w), "eject did not restore the original W"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_train_step_then_eject_restores_original_weights(dtype: torch.dtype) -> None:
    """Acceptance: inject → one AdamW step → eject gives the original weights bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.GELU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 8)).to(
        dtype
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lorazoo.inject(model, "olora", targets=[nn.Linear], r=4, alpha=8)
    rewritten = [h.weight.detach().clone() for _, h in hosts(model)]
    assert any(not _same_bits(r, before[f"{i * 2}.weight"]) for i, r in enumerate(rewritten)), (
        "the base should be rewritten while OLoRA is attached"
    )
    opt = torch.optim.AdamW(lorazoo.param_groups(model, lr=1e-2))
    x = torch.randn(16, 24).to(dtype)
    target = torch.randn(16, 8).to(dtype)
    loss = (model(x).float() - target.float()).pow(2).mean()
    loss.backward()
    a_before = [h.adapters["default"].lora_A.detach().clone() for _, h in hosts(model)]
    opt.step()
    after_step = [h.adapters["default"].lora_A for _, h in hosts(model)]
    moved = [not torch.equal(a, b) for a, b in zip(a_before, after_step, strict=True)]
    assert all(moved), "the optimizer step did not reach every adapter"
    for r, (_, h) in zip(rewritten, hosts(model), strict=True):
        assert _same_bits(h.weight, r), "training changed the frozen rewritten base"
    lorazoo.eject(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert _same_bits(after[k], v), f"{k} differs from the original after eject"


def test_rank_larger_than_layer_is_refused_and_model_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 6))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorazoo.ConfigError, match=r"r=8 is too large: use r <= 6"):
        lorazoo.inject(model, "olora", targets=[nn.Linear], r=8)
    assert not hosts(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_rslora_flag_is_validated() -> None:
    with pytest.raises(lorazoo.ConfigError, match="rslora must be True or False"):
        lorazoo.variant("olora").config_class(rslora="yes")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_reruns_init_on_original_base_and_keeps_file_tensors(tmp_path, dtype: torch.dtype) -> None:
    """lorazoo.load builds the adapter on the original W (QR again), copies the file's A, B in,
    and only then rewrites the base with the construction-time B₀, A₀ — not the loaded A, B."""
    torch.manual_seed(3)
    base = nn.Sequential(nn.Linear(20, 12), nn.Linear(12, 20)).to(dtype)
    fresh = copy.deepcopy(base)
    originals = {k: v.clone() for k, v in base.state_dict().items()}
    lorazoo.inject(base, "olora", targets=[nn.Linear], r=5, alpha=10)
    with torch.no_grad():
        for _, h in hosts(base):
            a = h.adapters["default"]
            a.lora_A.mul_(1.5).add_(0.25)
            a.lora_B.mul_(-0.5)
    x = torch.randn(6, 20).to(dtype)
    base.eval()
    with torch.no_grad():
        y = base[1](base[0](x))
    path = lorazoo.save(base, tmp_path / "olora.safetensors")
    lorazoo.load(fresh, path)
    fresh.eval()
    for (_, h1), (_, h2) in zip(hosts(base), hosts(fresh), strict=True):
        a1, a2 = h1.adapters["default"], h2.adapters["default"]
        assert torch.equal(a1.lora_A, a2.lora_A) and torch.equal(a1.lora_B, a2.lora_B)
        assert _same_bits(h1.weight, h2.weight), "loaded base is not the W_res of the original init"
        B0, A0 = a2.initial_factors
        assert not torch.equal(a2.lora_A, A0), "test needs trained tensors that differ from A₀"
    with torch.no_grad():
        assert _same_bits(fresh[1](fresh[0](x)), y), "forward differs after save → load"
    lorazoo.eject(fresh)
    for k, v in fresh.state_dict().items():
        assert _same_bits(v, originals[k]), f"{k}: eject after load does not restore the original"


@given(s=setups(dtypes=(torch.float64, torch.float32, torch.bfloat16), rank_factor=2))
def test_export_to_rank_2r_lora_matches_olora_forward(s: dict) -> None:
    """Invariant 6: the converted plain LoRA (rank 2r, α' = 2α or √2·α) on the original W equals
    the OLoRA forward within τ, and the base comes back bit for bit."""
    layer = _model(s)
    w = layer.weight.detach().clone()
    model = _inject(layer, s).eval()
    adapter = model[0].adapters["default"]
    g = torch.Generator().manual_seed(s["seed"] + 3)
    with torch.no_grad():
        adapter.lora_A.add_(torch.randn(adapter.lora_A.shape, generator=g).to(adapter.lora_A) * 0.3)
        adapter.lora_B.add_(torch.randn(adapter.lora_B.shape, generator=g).to(adapter.lora_B) * 0.3)
    x = _x(s)
    with torch.no_grad():
        y_olora = model(x)
    to_lora(model)
    host = model[0]
    assert _same_bits(host.weight, w), "the converted model's base is not the original W"
    new = host.adapters["default"]
    assert type(new).name == ("rslora" if s["rslora"] else "lora")
    assert new.config.r == 2 * s["r"]
    assert math.isclose(new.scale, adapter.scale, rel_tol=4 * U32)
    with torch.no_grad():
        y_lora = model(x)
    tau = merge_tolerance(x, host.weight, host.bias, [new.lowrank()], s["dtype"])
    diff = (y_lora.double() - y_olora.double()).abs()
    assert bool((diff <= tau).all()), f"exported LoRA differs from OLoRA by {float(diff.max()):.3g}"


def test_exported_lora_file_applies_to_the_original_base(tmp_path) -> None:
    """After to_lora the file is a plain LoRA relative to the original W: loaded onto an untouched
    copy of the base it reproduces the converted model bit for bit."""
    torch.manual_seed(5)
    base = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
    plain = copy.deepcopy(base)
    lorazoo.inject(base, "olora", targets=[nn.Linear], r=4, alpha=8)
    with torch.no_grad():
        for _, h in hosts(base):
            h.adapters["default"].lora_B.add_(0.1)
    to_lora(base)
    x = torch.randn(5, 16)
    base.eval()
    with torch.no_grad():
        y = base(x)
    path = lorazoo.save(base, tmp_path / "lora.safetensors")
    lorazoo.load(plain, path)
    assert lorazoo.adapter_names(plain) == {"default": "lora"}
    plain.eval()
    with torch.no_grad():
        assert _same_bits(plain(x), y)


def test_export_refuses_merged_and_non_olora_adapters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    lorazoo.inject(model, "lora", targets=[nn.Linear], r=2, name="plain")
    with pytest.raises(lorazoo.LorazooError, match="converts OLoRA adapters only"):
        to_lora(model, "plain")
    lorazoo.inject(model, "olora", targets=[nn.Linear], r=2, name="ortho")
    lorazoo.merge(model)
    weight = model[0].weight.detach().clone()
    with pytest.raises(lorazoo.LorazooError, match="unmerge before converting"):
        to_lora(model, "ortho")
    assert torch.equal(model[0].weight, weight) and set(lorazoo.adapter_names(model)) == {"plain", "ortho"}


def test_qr_factors_follow_the_adapter_dtype() -> None:
    w = torch.randn(10, 6, dtype=torch.bfloat16)
    B0, A0 = qr_factors(w, 3, torch.float32)
    q, r = torch.linalg.qr(w.float())
    assert torch.equal(B0, q[:, :3]) and torch.equal(A0, r[:3])
    assert OLoRA.num_trainable(6, 10, lorazoo.variant("olora").config_class(r=3)) == 3 * 16


def test_export_refuses_rank_2r_above_layer_size_and_changes_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    original = model[0].weight.detach().clone()
    lorazoo.inject(model, "olora", targets=[nn.Linear], r=4)
    w_res = model[0].weight.detach().clone()
    with pytest.raises(lorazoo.LorazooError, match="as a rank-8 lora: r=8 is larger than"):
        to_lora(model)
    assert lorazoo.adapter_names(model) == {"default": "olora"}
    assert _same_bits(model[0].weight, w_res)
    lorazoo.eject(model)
    assert _same_bits(model[0].weight, original)


@pytest.mark.parametrize("rslora", [False, True])
def test_init_matches_peft_bit_for_bit(rslora: bool) -> None:
    """PEFT 0.21.2's init_lora_weights="olora" gives the same A, B and rewritten base."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Linear(20, 7))
    twin = copy.deepcopy(model)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["0", "1"], init_lora_weights="olora", use_rslora=rslora
    )
    pm = peft.get_peft_model(model, cfg)
    lorazoo.inject(twin, "olora", targets=[nn.Linear], r=4, alpha=8, rslora=rslora)
    for i in range(2):
        theirs = pm.base_model.model[i]
        ours = twin[i]
        assert _same_bits(theirs.base_layer.weight, ours.weight)
        assert _same_bits(theirs.lora_A["default"].weight, ours.adapters["default"].lora_A)
        assert _same_bits(theirs.lora_B["default"].weight, ours.adapters["default"].lora_B)


def test_disabled_runs_on_the_rewritten_base() -> None:
    """lorazoo.disabled turns the adapter off but keeps W_res (as PEFT's disable_adapter does):
    the output is W_res·x + b bit for bit, which is not the original model's output."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 16)
    x = torch.randn(4, 16)
    with torch.no_grad():
        y_orig = layer(x)
    model = lorazoo.inject(nn.Sequential(layer), "olora", targets=[nn.Linear], r=8, alpha=8)
    host = model[0]
    with torch.no_grad(), lorazoo.disabled(model):
        y_off = model(x)
    assert _same_bits(y_off, torch.nn.functional.linear(x, host.weight, host.bias).detach())
    assert float((y_off - y_orig).abs().max()) > 0.01
