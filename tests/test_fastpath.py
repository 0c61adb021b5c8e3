"""The engine's fast paths give what the general paths give.

* The fused forward (``y.addmm_(drop(x)·Aᵀ, Bᵀ, alpha=s)``, for variants that keep
  ``LowRankAdapter``'s forward) equals the general path (``y + adapter(x, y, host)``) within the
  §11 tolerance, its gradients too, and bit for bit where the general path is exact (B = 0).
  Variants that change the forward, other dtypes and autocast take the general path.
* The chunked exact update restores every bit for shapes that cross chunk boundaries, with
  row scales, wide entries, sparse and dense records and non-contiguous weights; its helpers
  find exactly what a brute-force search finds.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorazoo
from lorazoo.engine import exact
from lorazoo.engine.layer import AdaptedLinear, fusable
from lorazoo.testing import merge_tolerance
from lorazoo.variant import LowRankAdapter


def general_forward(host: AdaptedLinear, x: torch.Tensor) -> torch.Tensor:
    """The general path, spelled out: base output plus each adapter's contribution."""
    y = nn.functional.linear(x, host.weight, host.bias)
    out = y
    for name in host.active:
        out = out + host.adapters[name](x, y, host).to(y.dtype)
    return out


def adapted(variant: str = "lora", r: int = 4, d_in: int = 24, d_out: int = 20, dtype=torch.float32, **hyper):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out, dtype=dtype))
    lorazoo.inject(model, variant, targets=nn.Linear, r=r, alpha=3.0 * r, **hyper)
    with torch.no_grad():
        for _, _, a in lorazoo.engine.iter_adapters(model):
            a.lora_B.normal_(std=0.5)
    return model


class Override(LowRankAdapter):
    """A variant with its own forward (like DoRA): it reads and saves the base output."""

    name = "test-override"

    def forward(self, x, base_out, host):
        return self.lowrank_out(x) + 0.25 * torch.tanh(base_out) * self.lora_B.sum()


class OptOut(LowRankAdapter):
    name = "test-optout"
    fused_forward = False


def test_fusable_only_for_the_unchanged_lowrank_forward():
    assert fusable(lorazoo.variant("lora"))
    assert fusable(lorazoo.variant("rslora"))
    assert not fusable(Override)
    assert not fusable(OptOut)
    if "dora" in lorazoo.variants():
        assert not fusable(lorazoo.variant("dora")), "DoRA's forward is not LoRA's"
    if "vera" in lorazoo.variants():
        assert not fusable(lorazoo.variant("vera"))


@pytest.mark.parametrize("variant", ["lora", "rslora"])
@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24)])
def test_fused_forward_matches_general_within_tolerance(variant, shape):
    model = adapted(variant)
    host = model[0]
    x = torch.randn(*shape)
    with torch.no_grad():
        fused = model(x)
        ref = general_forward(host, x)
    a = host.adapters["default"]
    tau = merge_tolerance(x, host.weight, host.bias, [a.lowrank()])
    assert not torch.equal(fused, nn.functional.linear(x, host.weight, host.bias)), "adapter had no effect"
    assert ((fused - ref).abs() <= tau).all(), float((fused - ref).abs().max())


def test_fused_forward_is_exact_at_initialisation():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(24, 20))
    x = torch.randn(7, 24)
    base = model(x).detach()
    lorazoo.inject(model, "lora", targets=nn.Linear, r=4)
    assert torch.equal(model(x), base)


def test_fused_gradients_match_general():
    model = adapted("lora")
    host = model[0]
    a = host.adapters["default"]
    x1 = torch.randn(6, 24, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    model(x1).pow(2).sum().backward()
    grads = [t.grad.clone() for t in (a.lora_A, a.lora_B)] + [x1.grad.clone()]
    a.zero_grad()
    general_forward(host, x2).pow(2).sum().backward()
    ref = [a.lora_A.grad, a.lora_B.grad, x2.grad]
    for g, r in zip(grads, ref, strict=True):
        scale = r.abs().max().item()
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-5 * scale)
    assert host.weight.grad is None, "the base stays frozen on the fused path"


def test_fused_dropout_draws_the_same_mask_as_the_general_path():
    model = adapted("lora", dropout=0.5)
    model.train()
    host = model[0]
    x = torch.randn(2, 3, 24)
    torch.manual_seed(7)
    fused = model(x)
    torch.manual_seed(7)
    ref = general_forward(host, x)
    torch.manual_seed(8)
    other = model(x)
    tau = merge_tolerance(x, host.weight, host.bias, [host.adapters["default"].lowrank()])
    assert ((fused - ref).abs() <= tau).all()
    assert not torch.allclose(fused, other), "dropout had no effect"


def test_general_adapter_beside_a_fused_one_keeps_its_saved_base_output():
    """The fused adapter writes into the output in place; an adapter that saved the base output
    for backward must still see it unchanged (autograd would raise otherwise)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 20))
    lorazoo.inject(model, Override, targets=nn.Linear, r=4, name="own")
    lorazoo.inject(model, "lora", targets=nn.Linear, r=4, name="fast")
    host = model[0]
    with torch.no_grad():
        for a in host.adapters.values():
            a.lora_B.normal_(std=0.5)
    x = torch.randn(5, 24, requires_grad=True)
    out = model(x)
    out.sum().backward()
    assert host.adapters["own"].lora_B.grad is not None
    with torch.no_grad():
        ref = general_forward(host, x)
    lrs = [a.lowrank() for a in host.adapters.values()]
    tau = merge_tolerance(x, host.weight, host.bias, lrs) + 1e-5 * ref.abs()
    assert ((out.detach() - ref).abs() <= tau).all()


def test_other_dtype_takes_the_general_path_bit_for_bit():
    """A bf16 base with fp32 adapters (the default) is not fused: the output is the general
    path's exactly."""
    model = adapted("lora", dtype=torch.bfloat16)
    host = model[0]
    assert host.adapters["default"].lora_A.dtype == torch.float32
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x), general_forward(host, x))


def test_autocast_takes_the_general_path():
    model = adapted("lora")
    host = model[0]
    x = torch.randn(4, 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x)
        ref = general_forward(host, x)
    assert got.dtype == ref.dtype
    assert torch.equal(got, ref)


# ---- the exact update --------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


@settings(max_examples=25, deadline=None)
@given(
    d_out=st.integers(1, 70),
    d_in=st.integers(1, 300),
    k=st.integers(1, 5),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    rel=st.sampled_from([1e-3, 0.1, 3.0]),
    scaled=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_exact_update_round_trip_across_chunks(d_out, d_in, k, dtype, rel, scaled, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(d_out, d_in, generator=g) * 0.02).to(dtype)
    w.view(-1)[:: max(1, w.numel() // 7)] = 0  # zeros and tiny values make wide entries
    orig = w.clone()
    B = torch.randn(d_out, k, generator=g) * rel * 0.02
    A = torch.randn(k, d_in, generator=g) / max(1, k) ** 0.5
    row = (1 + 0.1 * torch.randn(d_out, generator=g)) if scaled else None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(exact, "_CHUNK_BYTES", 4 * 64)  # a few rows a chunk: many chunk boundaries
        res = exact.apply_update(w, B, A, row)
        assert (
            res.nbytes - res.n_wide * (res.wide_index.element_size() + res.wide_bits.element_size())
            <= w.numel()
        )
        exact.revert_update(w, B, A, row, res)
    assert torch.equal(_bits(w), _bits(orig))


def test_exact_update_non_contiguous_weight():
    torch.manual_seed(0)
    base = torch.randn(40, 30) * 0.02
    w = base.t()  # 30 × 40, not contiguous
    orig = w.clone()
    B, A = torch.randn(30, 3) * 0.01, torch.randn(3, 40)
    res = exact.apply_update(w, B, A)
    assert not torch.equal(w, orig)
    merged = orig + B @ A
    assert torch.allclose(w, merged, atol=1e-6)
    exact.revert_update(w, B, A, None, res)  # exact through a contiguous copy
    assert torch.equal(_bits(w), _bits(orig)) and w.stride() == (1, 30)
    exact.apply_update(w, B, A)
    exact.revert_update(w, B, A, None, None)  # the arithmetic undo still works
    assert torch.allclose(w, orig, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 500), share=st.floats(0.0, 1.0), offset=st.integers(0, 9), seed=st.integers(0, 999))
def test_nonzero_int8_matches_torch(n, share, offset, seed):
    g = torch.Generator().manual_seed(seed)
    full = (
        (torch.rand(n + offset, generator=g) < share) * torch.randint(-128, 128, (n + offset,), generator=g)
    ).to(torch.int8)
    flat = full[offset:]
    assert torch.equal(exact._nonzero_int8(flat), torch.nonzero(flat).squeeze(1))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), cols=st.sampled_from([3, 64, 100, 128]), seed=st.integers(0, 999))
def test_out_of_int8_matches_brute_force(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    diff = torch.randint(-3, 4, (rows, cols), generator=g, dtype=torch.int32)
    picks = torch.randint(0, rows * cols, (3,), generator=g)
    vals = torch.tensor([128, -129, 2**31 - 1], dtype=torch.int32)
    diff.view(-1)[picks] = vals
    if seed % 3 == 0:
        diff.view(-1)[picks[0]] = torch.iinfo(torch.int32).min  # escapes abs(): must still be found
    flat = diff.reshape(-1)
    want = torch.nonzero((flat < -128) | (flat > 127)).squeeze(1)
    assert torch.equal(torch.sort(exact._out_of_int8(diff)).values, want)


def test_merge_unmerge_model_bit_exact_with_fused_layers():
    """End to end on a model whose forward takes the fused path: merged equals unmerged within
    τ, and unmerge restores the weights bit for bit."""
    model = adapted("lora", d_in=96, d_out=80)
    host = model[0]
    before = host.weight.detach().clone()
    x = torch.randn(3, 96)
    with torch.no_grad():
        unmerged = model(x)
        lorazoo.merge(model)
        merged = model(x)
        lorazoo.unmerge(model)
    tau = merge_tolerance(x, before, host.bias, [host.adapters["default"].lowrank()])
    assert ((merged - unmerged).abs() <= tau).all()
    assert torch.equal(_bits(host.weight.detach()), _bits(before))
    assert copy.deepcopy(model)(x).shape == (3, 80)


class Whole(LowRankAdapter):
    """A variant that produces the whole layer output itself (the ``output`` hook), counting
    how often the engine hands it the layer."""

    name = "test-whole"
    calls = 0

    def output(self, x, base_out, host):
        type(self).calls += 1
        return base_out.add_(self.lowrank_out(x))  # in place: the engine hands over a fresh output


def test_output_hook_runs_only_for_an_adapter_alone_on_its_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 20))
    lorazoo.inject(model, Whole, targets=nn.Linear, r=4, name="whole")
    host = model[0]
    with torch.no_grad():
        host.adapters["whole"].lora_B.normal_(std=0.5)
    x = torch.randn(5, 24)
    Whole.calls = 0
    with torch.no_grad():
        alone = model(x)
        assert Whole.calls == 1
        assert torch.equal(alone, general_forward(host, x))
        lorazoo.inject(model, "lora", targets=nn.Linear, r=4, name="other")
        beside = model(x)
        assert Whole.calls == 1, "the hook ran beside another adapter"
        ref = general_forward(host, x)
        lrs = [a.lowrank() for a in host.adapters.values()]
        assert ((beside - ref).abs() <= merge_tolerance(x, host.weight, host.bias, lrs)).all()
        host.set_active(["whole"])
        model(x)
        assert Whole.calls == 2
        lorazoo.merge(model)
        model(x)
        assert Whole.calls == 2, "the hook ran on a merged layer"


def test_default_output_is_base_plus_contribution():
    """``Variant.output`` by default adds ``forward``'s contribution, cast to the output dtype."""
    model = adapted("lora", dtype=torch.bfloat16)
    host = model[0]
    a = host.adapters["default"]
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        y = nn.functional.linear(x, host.weight, host.bias)
        out = LowRankAdapter.output(a, x, y, host)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, general_forward(host, x))


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_base_with_fp32_adapters_keeps_the_half_input_and_the_same_gradients(dtype):
    """fp32 adapters on a half-precision base (the default) take the general path's exact
    operations, forward and backward, but backward keeps the half-precision input (shared by
    adapters on the same input) instead of one fp32 copy per adapter."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"q": nn.Linear(24, 20, dtype=dtype), "k": nn.Linear(24, 20, dtype=dtype)})
    lorazoo.inject(model, "lora", targets=nn.Linear, r=4, alpha=8.0)
    lorazoo.testing.perturb(model, 0)
    x = torch.randn(6, 24).to(dtype).requires_grad_()
    gout = torch.randn(6, 20).to(dtype)

    def run(general: bool):
        for p in [*model.parameters(), x]:
            p.grad = None
        outs = []
        for host in model.values():
            outs.append(general_forward(host, x) if general else host(x))
        (outs[0] * gout + outs[1] * gout).float().sum().backward()
        adapters = [h.adapters["default"] for h in model.values()]
        return outs, [x.grad.clone()] + [t.grad.clone() for a in adapters for t in (a.lora_A, a.lora_B)]

    fast_out, fast_grads = run(False)
    ref_out, ref_grads = run(True)
    for a, b in zip(fast_out + fast_grads, ref_out + ref_grads, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    x_bytes = x.numel() * x.element_size()
    fast = _saved_bytes(lambda: [h(x) for h in model.values()])
    ref = _saved_bytes(lambda: [general_forward(h, x) for h in model.values()])
    # the general path keeps an fp32 copy of x per adapter; the cast path keeps x itself, once
    assert ref - fast == 2 * (2 * x_bytes) - x_bytes, (ref, fast, x_bytes)
