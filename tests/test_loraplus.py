"""LoRA+ (docs/spec/variants.md §4): LoRA's math with ``B`` in an optimizer group at ``λ·lr``.

The conformance suite (tests/test_properties.py) covers the LoRA invariants; these tests cover
what LoRA+ adds: the groups, their learning rates, the effect of one optimizer step, the
hyper-parameter checks, mixing with other variants and the file metadata.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lorazoo_plugins.loraplus import LoRAPlus, LoraPlusConfig
from torch import nn

import lorazoo
from lorazoo.io import read


def mlp(d: int = 12, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            up=nn.Linear(d, 2 * d, dtype=dtype),
            act=nn.GELU(),
            down=nn.Linear(2 * d, d, dtype=dtype),
            head=nn.Linear(d, 3, dtype=dtype),
        )
    )


def by_name(groups: list[dict]) -> dict[str, dict]:
    names = [g["name"] for g in groups]
    assert len(set(names)) == len(names), f"group names are not unique: {names}"
    return {g["name"]: g for g in groups}


def adapter_tensors(model: nn.Module, name: str, tensor: str) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if f".adapters.{name}.{tensor}" in n]


def assert_partition(model: nn.Module, groups: list[dict]) -> None:
    """Every trainable tensor of ``model`` in exactly one group, and nothing else in any."""
    placed = [id(p) for g in groups for p in g["params"]]
    assert len(placed) == len(set(placed)), "a tensor sits in two groups"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(placed) == trainable


# ---- the groups --------------------------------------------------------------------------------


@given(
    ratio=st.floats(1e-3, 1e3),
    lr=st.floats(1e-7, 1e-1),
    wd=st.sampled_from([0.0, 0.01, 0.1]),
    r=st.integers(1, 8),
    head=st.booleans(),
)
def test_groups_partition_with_b_at_ratio_times_lr(ratio, lr, wd, r, head):
    model = mlp()
    lorazoo.inject(model, "loraplus", targets=["up", "down"], r=r, lr_ratio=ratio)
    if head:
        model.head.weight.requires_grad_(True)  # an unfrozen head lands in "other" at lr
    groups = lorazoo.param_groups(model, lr=lr, weight_decay=wd)
    assert_partition(model, groups)
    g = by_name(groups)
    assert set(g) == {"loraplus.A", "loraplus.B"} | ({"other"} if head else set())
    assert {id(p) for p in g["loraplus.A"]["params"]} == {
        id(p) for p in adapter_tensors(model, "default", "lora_A")
    }
    assert {id(p) for p in g["loraplus.B"]["params"]} == {
        id(p) for p in adapter_tensors(model, "default", "lora_B")
    }
    assert g["loraplus.A"]["lr"] == lr
    # λ·lr is the B rate, computed once; the quotient λ·lr / lr is λ to within one rounding.
    assert g["loraplus.B"]["lr"] == ratio * lr
    assert math.isclose(g["loraplus.B"]["lr"] / g["loraplus.A"]["lr"], ratio, rel_tol=2**-52)
    assert g["loraplus.A"]["weight_decay"] == wd and g["loraplus.B"]["weight_decay"] == wd
    if head:
        assert g["other"]["lr"] == lr and g["other"]["params"] == [model.head.weight]


@pytest.mark.parametrize("ratio", [16.0, 1.0, 2.0**-3, 2.0**7])
@pytest.mark.parametrize("lr", [2e-4, 1e-3, 3e-5, 0.1])
def test_ratio_of_group_rates_is_exactly_lambda(ratio, lr):
    """For λ a power of two (the default 16 among them) the quotient is exact in floating point;
    for other λ it can be one ulp off, which the property test above allows."""
    model = mlp()
    lorazoo.inject(model, "loraplus", targets="all-linear", r=4, lr_ratio=ratio)
    g = by_name(lorazoo.param_groups(model, lr=lr))
    assert g["loraplus.B"]["lr"] / g["loraplus.A"]["lr"] == ratio


def test_default_ratio_is_16_and_embedding_rate_1e_6():
    cfg = LoraPlusConfig()
    assert (cfg.lr_ratio, cfg.lr_embedding, cfg.r, cfg.alpha, cfg.dropout) == (16.0, 1e-6, 8, 8.0, 0.0)
    model = mlp()
    lorazoo.inject(model, "loraplus", targets=["up"])
    g = by_name(lorazoo.param_groups(model, lr=1e-3))
    assert g["loraplus.B"]["lr"] / g["loraplus.A"]["lr"] == 16.0


@dataclass(frozen=True)
class _EmbeddingLayer(lorazoo.LayerInfo):
    """A layer description saying "embedding". The engine wraps only ``nn.Linear`` today, so no
    ``inject`` can produce one; this checks the grouping rule LoRA+ keys on."""

    kind: str = "embedding"


def _layer(cls=lorazoo.LayerInfo, d_in=6, d_out=5) -> lorazoo.LayerInfo:
    w = torch.zeros(d_out, d_in)
    return cls(path="emb", d_in=d_in, d_out=d_out, weight=w, has_bias=False, adapter_dtype=torch.float32)


def test_embedding_adapters_sit_only_in_the_embedding_group():
    cfg = LoraPlusConfig(r=2, lr_ratio=8.0, lr_embedding=3e-6)
    emb = LoRAPlus(_layer(_EmbeddingLayer), cfg)
    lin = LoRAPlus(_layer(), cfg)
    assert emb.on_embedding and not lin.on_embedding
    g = by_name(LoRAPlus.param_groups([emb, lin], lr=1e-3, weight_decay=0.05))
    assert set(g) == {"loraplus.A", "loraplus.B", "loraplus.embed"}
    assert g["loraplus.embed"]["params"] == [emb.lora_A, emb.lora_B]
    assert (g["loraplus.embed"]["lr"], g["loraplus.embed"]["weight_decay"]) == (3e-6, 0.05)
    assert g["loraplus.A"]["params"] == [lin.lora_A] and g["loraplus.B"]["params"] == [lin.lora_B]


def test_engine_built_adapters_are_not_embedding_adapters():
    """Every layer the engine adapts is an ``nn.Linear``, even one whose name says embedding."""
    model = nn.Sequential(OrderedDict(embed_proj=nn.Linear(4, 4)))
    lorazoo.inject(model, "loraplus", targets=["embed_proj"], r=2)
    (adapter,) = [m for m in model.modules() if isinstance(m, LoRAPlus)]
    assert adapter.on_embedding is False
    assert "loraplus.embed" not in by_name(lorazoo.param_groups(model, lr=1e-3))


class _BiasedLoRAPlus(LoRAPlus):
    """LoRA+ with PEFT's ``lora_B.bias`` and a 1-D non-bias tensor, as a subclass would add them:
    the table's rule for 1-D tensors (B rate; no decay for biases)."""

    name = "loraplus_biased"

    def __init__(self, layer, config, shared=None):
        super().__init__(layer, config, shared)
        self.lora_B_bias = nn.Parameter(torch.zeros(layer.d_out))
        self.gain = nn.Parameter(torch.ones(layer.d_out))


def test_one_dimensional_tensors_go_with_b_and_biases_without_decay():
    cfg = LoraPlusConfig(r=2, lr_ratio=4.0)
    a = _BiasedLoRAPlus(_layer(), cfg)
    g = by_name(_BiasedLoRAPlus.param_groups([a], lr=0.01, weight_decay=0.1))
    assert g["loraplus_biased.A"]["params"] == [a.lora_A]
    assert g["loraplus_biased.B"]["params"] == [a.lora_B, a.gain]
    assert g["loraplus_biased.B_bias"]["params"] == [a.lora_B_bias]
    assert g["loraplus_biased.B"]["lr"] == g["loraplus_biased.B_bias"]["lr"] == 4.0 * 0.01
    assert (g["loraplus_biased.B"]["weight_decay"], g["loraplus_biased.B_bias"]["weight_decay"]) == (0.1, 0.0)


# ---- one optimizer step --------------------------------------------------------------------------


def _twins(ratio: float, dtype: torch.dtype, seed: int) -> tuple[nn.Module, nn.Module]:
    """A LoRA model and a LoRA+ model with identical base and adapter tensors."""
    models = []
    for variant, extra in (("lora", {}), ("loraplus", {"lr_ratio": ratio})):
        m = mlp(seed=seed, dtype=dtype)
        torch.manual_seed(seed + 1)
        lorazoo.inject(m, variant, targets=["up", "down"], r=3, alpha=6.0, **extra)
        models.append(m)
    return models[0], models[1]


def _sgd_step(model: nn.Module, lr: float, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One SGD step with the given gradient; returns how far each adapter tensor moved."""
    before = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    for k, p in model.named_parameters():
        if p.requires_grad:
            p.grad = grads[k.split(".adapters.")[0] + "." + k.rsplit(".", 1)[-1]].clone()
    torch.optim.SGD(lorazoo.param_groups(model, lr=lr)).step()
    return {k: p.detach() - before[k] for k, p in model.named_parameters() if p.requires_grad}


def _fixed_grads(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k.split(".adapters.")[0] + "." + k.rsplit(".", 1)[-1]: torch.randn(
            p.shape, generator=g, dtype=p.dtype
        )
        for k, p in model.named_parameters()
        if p.requires_grad
    }


@pytest.mark.parametrize("ratio", [16.0, 2.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sgd_step_from_init_moves_b_exactly_lambda_times_lora(ratio, dtype):
    """From initialisation (``B = 0``) the step is ``−η·g`` rounded once; for λ a power of two
    that scales exactly, so the comparison is bit for bit."""
    lora, plus = _twins(ratio, dtype, seed=3)
    grads = _fixed_grads(lora, seed=4)
    step_lora = _sgd_step(lora, 1e-3, grads)
    step_plus = _sgd_step(plus, 1e-3, grads)
    assert step_lora.keys() == step_plus.keys() and len(step_lora) == 4
    for k in step_lora:
        if k.endswith("lora_B"):
            assert step_lora[k].abs().max() > 0
            assert torch.equal(step_plus[k], ratio * step_lora[k]), k
        else:
            assert torch.equal(step_plus[k], step_lora[k]), k


@given(ratio=st.floats(1e-2, 1e2), lr=st.floats(1e-5, 1e-1), seed=st.integers(0, 2**16))
def test_sgd_step_moves_b_lambda_times_lora_and_a_the_same(ratio, lr, seed):
    """From a trained state (``B ≠ 0``) in fp64. ``A`` moves bit for bit as LoRA's. A step
    ``Δ = fl(fl(B + fl(−η·g)) − B)`` differs from ``−η·g`` by at most ``u·(|B| + 3η|g|)`` (one
    rounding each for the product, the sum and the difference); LoRA+'s rate ``fl(λ·η)`` adds
    ``u·λη|g|``, and scaling LoRA's step by ``λ`` multiplies its error by ``λ`` and adds
    ``u·λη|g|``. So ``|Δ₊ − λ·Δ| ≤ u·((1 + λ)·|B| + 8λη|g|)`` per element, checked with a safety
    factor of 2."""
    lora, plus = _twins(ratio, torch.float64, seed=seed % 7)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in zip(lora.parameters(), plus.parameters(), strict=True):
            if a.requires_grad:
                noise = torch.randn(a.shape, generator=g, dtype=a.dtype)
                a.add_(noise)
                b.add_(noise)
    B_before = {k: p.detach().clone() for k, p in plus.named_parameters() if k.endswith("lora_B")}
    grads = _fixed_grads(lora, seed=seed + 1)
    step_lora = _sgd_step(lora, lr, grads)
    step_plus = _sgd_step(plus, lr, grads)
    u = 2.0**-53
    for k in step_lora:
        if k.endswith("lora_B"):
            gk = grads[k.split(".adapters.")[0] + ".lora_B"]
            bound = 2 * u * ((1 + ratio) * B_before[k].abs() + 8 * ratio * lr * gk.abs())
            err = (step_plus[k] - ratio * step_lora[k]).abs()
            assert bool((err <= bound).all()), f"{k}: {(err / bound).max():.2f} × the bound"
        else:
            assert torch.equal(step_plus[k], step_lora[k]), k


# ---- the math is LoRA's -----------------------------------------------------------------------------


def test_forward_merge_and_count_equal_lora():
    lora, plus = _twins(16.0, torch.float32, seed=5)
    with torch.no_grad():
        for a, b in zip(lora.parameters(), plus.parameters(), strict=True):
            if a.requires_grad:
                noise = torch.randn_like(a)
                a.add_(noise)
                b.add_(noise)
    x = torch.randn(7, 12)
    assert torch.equal(lora(x), plus(x))
    assert lorazoo.trainable(lora) == lorazoo.trainable(plus)
    assert LoRAPlus.num_trainable(12, 24, LoraPlusConfig(r=3)) == 3 * (12 + 24)
    lorazoo.merge(lora)
    lorazoo.merge(plus)
    assert torch.equal(lora.up.weight, plus.up.weight) and torch.equal(lora.down.weight, plus.down.weight)


# ---- hyper-parameter checks ----------------------------------------------------------------------


@pytest.mark.parametrize("field", ["lr_ratio", "lr_embedding"])
@pytest.mark.parametrize("value", [0, 0.0, -1.0, float("nan"), float("inf"), True, "16", None])
def test_bad_rates_are_rejected_and_leave_the_model_unchanged(field, value):
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    with pytest.raises(lorazoo.ConfigError, match=field) as info:
        lorazoo.inject(model, "loraplus", targets="all-linear", **{field: value})
    assert "> 0" in str(info.value) or "positive" in str(info.value)
    assert not lorazoo.adapter_names(model)
    assert dict(model.named_modules()) == modules
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_keyword_names_the_close_one():
    with pytest.raises(lorazoo.ConfigError, match="lr_ratio"):
        lorazoo.inject(mlp(), "loraplus", targets=["up"], lr_raito=8.0)


# ---- mixing with other variants -------------------------------------------------------------------


def test_each_variant_shapes_only_its_own_adapters():
    model = mlp()
    lorazoo.inject(model, "lora", targets=["up"], name="plain", r=2)
    lorazoo.inject(model, "loraplus", targets=["up", "down"], name="fast", r=3, lr_ratio=8.0)
    lorazoo.inject(model, "rslora", targets=["down"], name="stable", r=2)
    groups = lorazoo.param_groups(model, lr=2e-3, weight_decay=0.01)
    assert_partition(model, groups)
    g = by_name(groups)
    assert set(g) == {"lora", "rslora", "loraplus.A", "loraplus.B"}
    ids = lambda name, t: {id(p) for p in adapter_tensors(model, name, t)}  # noqa: E731
    assert {id(p) for p in g["lora"]["params"]} == ids("plain", "lora_A") | ids("plain", "lora_B")
    assert {id(p) for p in g["rslora"]["params"]} == ids("stable", "lora_A") | ids("stable", "lora_B")
    assert {id(p) for p in g["loraplus.A"]["params"]} == ids("fast", "lora_A")
    assert {id(p) for p in g["loraplus.B"]["params"]} == ids("fast", "lora_B")
    assert g["lora"]["lr"] == g["rslora"]["lr"] == g["loraplus.A"]["lr"] == 2e-3
    assert g["loraplus.B"]["lr"] == 8.0 * 2e-3


def test_two_loraplus_adapters_keep_their_own_ratio():
    model = mlp()
    lorazoo.inject(model, "loraplus", targets=["up"], name="x", r=2, lr_ratio=4.0)
    lorazoo.inject(model, "loraplus", targets=["up", "down"], name="y", r=2)
    groups = lorazoo.param_groups(model, lr=1e-3)
    assert_partition(model, groups)
    g = by_name(groups)
    assert set(g) == {"loraplus.A", "loraplus.B[lr=0.004]", "loraplus.B[lr=0.016]"}
    ids = lambda name, t: {id(p) for p in adapter_tensors(model, name, t)}  # noqa: E731
    assert {id(p) for p in g["loraplus.A"]["params"]} == ids("x", "lora_A") | ids("y", "lora_A")
    assert {id(p) for p in g["loraplus.B[lr=0.004]"]["params"]} == ids("x", "lora_B")
    assert {id(p) for p in g["loraplus.B[lr=0.016]"]["params"]} == ids("y", "lora_B")


# ---- the file ---------------------------------------------------------------------------------------


def test_file_records_the_ratio_and_a_reload_keeps_the_groups(tmp_path):
    model = mlp()
    lorazoo.inject(model, "loraplus", targets=["up", "down"], r=2, lr_ratio=12.5, lr_embedding=2e-6)
    path = lorazoo.save(model, tmp_path / "plus.safetensors")
    doc, tensors = read(path)
    assert doc["variant"] == "loraplus"
    assert doc["config"]["lr_ratio"] == 12.5 and doc["config"]["lr_embedding"] == 2e-6
    assert set(doc["modules"]) == {"up", "down"}
    assert all(info["loraplus_lr_ratio"] == 12.5 for info in doc["modules"].values())
    assert set(tensors) == {"up.lora_A", "up.lora_B", "down.lora_A", "down.lora_B"}

    fresh = lorazoo.load(mlp(), path)
    want = {(g["name"], g["lr"]) for g in lorazoo.param_groups(model, lr=1e-3)}
    assert {(g["name"], g["lr"]) for g in lorazoo.param_groups(fresh, lr=1e-3)} == want
    assert ("loraplus.B", 12.5 * 1e-3) in want
