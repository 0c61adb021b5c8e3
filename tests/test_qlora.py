"""The ``qlora`` variant: LoRA math, the base recipe in its config, the ``base_storage`` marker,
its refusal of a layer that does not reach it in NF4, and its claim evaluated on synthetic bench
figures. The engine side (quantising on inject, merge on packed storage, files) is in
test_qlora_engine.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from lorazoo_plugins.lora import LoRA
from lorazoo_plugins.qlora import LEARNED_MARGIN, QLoRA, QLoraConfig
from torch import nn

import lorazoo
from lorazoo.claims import FAILS, HOLDS, INCONCLUSIVE, evaluate
from lorazoo.errors import ConfigError
from lorazoo.variant import LayerInfo


def _info(storage: str | None = None, d_in=32, d_out=24) -> LayerInfo:
    info = LayerInfo("blk.proj", d_in, d_out, torch.zeros(d_out, d_in), True, torch.float32)
    if storage is not None:  # what the engine's LayerInfo will say for an NF4 base
        object.__setattr__(info, "storage", storage)
    return info


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = nn.Linear(32, 24)
        self.v_proj = nn.Linear(32, 24)

    def forward(self, x):
        return self.q_proj(x) + self.v_proj(x)


def _state(model: nn.Module):
    return [(n, type(m)) for n, m in model.named_modules()], {
        k: v.clone() for k, v in model.state_dict().items()
    }


def test_config_defaults_and_validation():
    cfg = QLoraConfig()
    assert (cfg.r, cfg.alpha, cfg.quant_type, cfg.block_size, cfg.double_quant) == (8, 8.0, "nf4", 64, True)
    assert QLoraConfig(double_quant=False).double_quant is False
    for kwargs, match in [
        ({"quant_type": "fp4"}, "quant_type must be one of 'nf4', got 'fp4'"),
        ({"block_size": 128}, "block_size must be 64"),
        ({"block_size": True}, "block_size must be 64"),
        ({"block_size": 64.0}, "block_size must be 64"),
        ({"double_quant": 1}, "double_quant must be True or False"),
        ({"r": 0}, "r must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=match):
            QLoraConfig(**kwargs)
    with pytest.raises(ConfigError, match="did you mean 'block_size'"):
        QLoraConfig.from_kwargs(blocksize=64)


def test_it_is_lora_with_the_nf4_marker():
    assert issubclass(QLoRA, LoRA) and QLoRA.name == "qlora"
    assert QLoRA.base_storage == "nf4" and not hasattr(LoRA, "base_storage")
    assert QLoRA.layer_kinds == frozenset({"linear"})
    cfg = QLoraConfig(r=4, alpha=8)
    assert QLoRA.num_trainable(32, 24, cfg) == 4 * (32 + 24)
    # same math as LoRA: an adapter built on an NF4 layer info gives LoRA's output and ΔW
    info = _info("nf4")
    QLoRA.check_layer(info, cfg)
    torch.manual_seed(3)
    a = QLoRA(info, cfg)
    torch.manual_seed(3)
    b = LoRA(info, lorazoo.variant("lora").config_class(r=4, alpha=8))
    with torch.no_grad():
        a.lora_B.normal_()
        b.lora_B.copy_(a.lora_B)
    assert torch.equal(a.lora_A, b.lora_A)
    x = torch.randn(5, 32)
    assert torch.equal(a.lowrank_out(x), b.lowrank_out(x))
    assert torch.equal(a.delta_weight(info.weight), b.delta_weight(info.weight))
    assert a.scale == 2.0


def test_check_layer_refuses_a_dense_base_and_still_checks_the_rank():
    cfg = QLoraConfig(r=4)
    for storage in (None, "dense"):
        with pytest.raises(ConfigError, match="reaches it stored as 'dense'") as e:
            QLoRA.check_layer(_info(storage), cfg)
        assert "'blk.proj'" in str(e.value) and "'lora'" in str(e.value)
    with pytest.raises(ConfigError, match="r=40 is larger"):
        QLoRA.check_layer(_info("nf4"), QLoraConfig(r=40))


def test_inject_quantises_the_targets_and_leaves_the_rest_dense():
    from lorazoo.quant import NF4Linear, quantize_nf4

    model = Net()
    w = model.q_proj.weight.detach().clone()
    lorazoo.inject(model, "qlora", targets=["q_proj"], r=2, alpha=2, double_quant=False)
    host = model.q_proj
    assert type(model.v_proj) is nn.Linear and host.kind.name == "nf4"
    ref = quantize_nf4(w, double_quant=False)
    assert torch.equal(host.weight_codes, ref.codes) and torch.equal(host.weight_absmax, ref.absmax)
    assert host.weight_absmax_scale is None
    lorazoo.eject(model)
    assert isinstance(model.q_proj, NF4Linear) and not model.q_proj.double_quant


def test_registered_by_name():
    assert "qlora" in lorazoo.variants() and lorazoo.variant("qlora") is QLoRA


# ---- the claim, on synthetic bench figures -----------------------------------------------------


def _runs(lora: list[float], qlora: list[float]) -> dict:
    return {
        ("lora", None): {s: {"learned_bpb": v} for s, v in enumerate(lora)},
        ("qlora", None): {s: {"learned_bpb": v} for s, v in enumerate(qlora)},
    }


def test_claim_compares_with_lora_on_the_full_precision_base():
    (claim,) = QLoRA.claims
    (check,) = claim.checks
    assert (check.metric, check.a.run, check.relation, check.b.run) == ("learned_bpb", "qlora", ">", "lora")
    assert check.slack == LEARNED_MARGIN == 0.02
    assert "2305.14314" in claim.paper and f"{LEARNED_MARGIN}" in claim.statement
    lora = [0.222, 0.210, 0.235, 0.220]
    # 0.01 below LoRA on every seed: within the margin -> holds
    result = evaluate(claim, _runs(lora, [x - 0.01 for x in lora]))
    assert result["verdict"] == HOLDS
    assert result["checks"][0]["difference"]["mean"] == pytest.approx(-0.01)
    # 0.03 below on every seed: beyond the margin -> fails
    assert evaluate(claim, _runs(lora, [x - 0.03 for x in lora]))["verdict"] == FAILS
    # noisy differences straddling -0.02 -> inconclusive
    assert (
        evaluate(claim, _runs(lora, [lora[0] - 0.00, lora[1] - 0.04, lora[2] - 0.01, lora[3] - 0.03]))[
            "verdict"
        ]
        == INCONCLUSIVE
    )
    # one seed is never enough
    assert evaluate(claim, _runs(lora[:1], [lora[0]]))["verdict"] == INCONCLUSIVE


def test_config_round_trips_through_its_dict():
    cfg = QLoraConfig(r=4, alpha=16, double_quant=False)
    assert QLoraConfig.from_kwargs(**cfg.to_dict()) == cfg
    assert cfg.replace(r=8) == dataclasses.replace(cfg, r=8)
    with pytest.raises(ConfigError, match="block_size must be 64"):
        cfg.replace(block_size=32)
