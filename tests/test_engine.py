"""Engine behaviour: targets, atomic injection, freezing, merge state, errors that leave the model
unchanged."""

import copy
import math
import re

import pytest
import torch
from torch import nn

import lorazoo
from lorazoo.bench.model import LlamaConfig, LlamaLike
from lorazoo.testing import merge_tolerance


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Module()
        self.block.q_proj = nn.Linear(16, 24, dtype=dtype)
        self.block.v_proj = nn.Linear(24, 16, bias=False, dtype=dtype)
        self.emb = nn.Embedding(10, 16)
        self.conv = nn.Conv3d(4, 4, 3)  # a layer type no built-in kind adapts
        self.lm_head = nn.Linear(16, 10, dtype=dtype)

    def forward(self, x):
        return self.lm_head(self.block.v_proj(torch.tanh(self.block.q_proj(x))))


def state(model):
    """Everything a user could observe about a model: module types, tensors, flags."""
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_same(before, model):
    mods, tensors, flags = before
    now_mods, now_tensors, now_flags = state(model)
    assert now_mods == mods
    assert now_tensors.keys() == tensors.keys()
    for k in tensors:
        assert torch.equal(now_tensors[k], tensors[k]), k
    assert now_flags == flags


def test_variants_sorted_and_lookup():
    names = lorazoo.variants()
    assert names == sorted(names)
    assert {"lora", "rslora"} <= set(names)
    assert lorazoo.variant("lora").name == "lora"


def test_unknown_variant_lists_known_and_closest():
    model = Net()
    before = state(model)
    with pytest.raises(lorazoo.UnknownVariantError) as e:
        lorazoo.inject(model, "lroa", targets=["q_proj"])
    msg = str(e.value)
    assert "Did you mean 'lora'" in msg and "rslora" in msg
    assert isinstance(e.value, lorazoo.LorazooError)
    assert_same(before, model)


@pytest.mark.parametrize(
    "hyper, fragment",
    [
        ({"r": 0}, "r must be >= 1"),
        ({"r": 2.5}, "r must be an integer"),
        ({"r": 17}, "larger than min(d_in, d_out)=16"),
        ({"alpha": 0}, "alpha must be a finite number > 0"),
        ({"alpha": float("nan")}, "alpha must be a finite number > 0"),
        ({"dropout": 1.0}, "0 <= dropout < 1"),
        ({"dropout": -0.1}, "0 <= dropout < 1"),
        ({"rank": 4}, "valid names are: r, alpha, dropout"),
        ({"alhpa": 4}, "did you mean 'alpha'"),
    ],
)
def test_bad_hyperparameters_change_nothing(hyper, fragment):
    model = Net()
    before = state(model)
    with pytest.raises(lorazoo.ConfigError) as e:
        lorazoo.inject(model, "lora", targets=["q_proj", "v_proj"], **hyper)
    assert fragment in str(e.value)
    assert_same(before, model)


def test_targets_matching_nothing_lists_modules():
    model = Net()
    before = state(model)
    with pytest.raises(lorazoo.TargetError) as e:
        lorazoo.inject(model, "lora", targets=["q_proj", "k_projj"])
    msg = str(e.value)
    assert "'k_projj' matched no module" in msg and "q_proj" in msg and "v_proj" in msg
    assert_same(before, model)


@pytest.mark.parametrize("target", ["block", "conv", ["q_proj", "conv"], ["emb", "conv"]])
def test_unsupported_layer_type_is_refused(target):
    model = Net()
    before = state(model)
    with pytest.raises(lorazoo.TargetError) as e:
        lorazoo.inject(model, "lora", targets=target)
    assert "cannot adapt" in str(e.value) and "nn.Linear" in str(e.value) and "nn.Embedding" in str(e.value)
    assert_same(before, model)


def test_embedding_refused_by_a_linear_only_variant():
    """Embeddings are supported layers, but only variants that declare the kind adapt them."""
    model = Net()
    before = state(model)
    with pytest.raises(lorazoo.ConfigError, match="'emb'"):
        lorazoo.inject(model, "dora", targets=["q_proj", "emb"])
    assert_same(before, model)


def test_target_forms():
    def chosen(targets):
        model = Net()
        lorazoo.inject(model, "lora", targets=targets, r=2)
        return sorted(p for p, _ in lorazoo.engine.hosts(model))

    assert chosen(["q_proj"]) == ["block.q_proj"]
    assert chosen(["block.v_proj"]) == ["block.v_proj"]
    assert chosen(re.compile(r"block\..*")) == ["block.q_proj", "block.v_proj"]
    assert chosen("re:.*_proj") == ["block.q_proj", "block.v_proj"]
    assert chosen(nn.Linear) == ["block.q_proj", "block.v_proj", "lm_head"]
    assert chosen(lambda name, m: name.endswith("v_proj")) == ["block.v_proj"]
    # all-linear leaves the output head alone (found by name here)
    assert chosen("all-linear") == ["block.q_proj", "block.v_proj"]


def test_all_linear_uses_get_output_embeddings():
    model = LlamaLike(LlamaConfig(num_layers=2, hidden_size=32, intermediate_size=48, num_heads=2))
    lorazoo.inject(model, "lora", targets="all-linear", r=2)
    paths = [p for p, _ in lorazoo.engine.hosts(model)]
    assert len(paths) == 2 * 7 and "lm_head" not in paths
    assert all(
        p.rsplit(".", 1)[-1] in {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        for p in paths
    )


class Exploding(lorazoo.LowRankAdapter):
    """Fails while preparing the base of its second layer."""

    name = "exploding"
    calls = 0

    def prepare_base(self, host, name):
        host.patch_base(name, torch.ones(host.out_features, 1), torch.ones(1, host.in_features))
        Exploding.calls += 1
        if Exploding.calls == 2:
            raise RuntimeError("boom")


class _ExplodingPlugin:
    @lorazoo.hookimpl
    def lorazoo_variants(self):
        return [Exploding]


def test_failed_injection_rolls_back_everything():
    plugin = _ExplodingPlugin()
    lorazoo.register(plugin, name="exploding-test")
    try:
        model = Net()
        lorazoo.inject(model, "lora", targets=["q_proj"], name="keep", r=2)
        before = state(model)
        Exploding.calls = 0
        with pytest.raises(RuntimeError, match="boom"):
            lorazoo.inject(model, "exploding", targets=["q_proj", "v_proj"], name="bad", r=2)
        assert_same(before, model)  # first layer's base rewrite and adapter were undone
        assert lorazoo.adapter_names(model) == {"keep": "lora"}
    finally:
        lorazoo.unregister(plugin)


def test_config_object_is_never_mutated():
    cfg = lorazoo.variant("lora").config_class(r=4, alpha=8.0)
    model = Net()
    lorazoo.inject(model, "lora", targets=["q_proj"], config=cfg, r=2)
    assert (cfg.r, cfg.alpha) == (4, 8.0)
    assert model.block.q_proj.adapters["default"].config.r == 2
    with pytest.raises(lorazoo.ConfigError):
        lorazoo.inject(Net(), "rslora", targets=["q_proj"], config=cfg)  # config of another variant


def test_base_keys_unchanged_and_base_checkpoint_loads_strictly():
    model = Net()
    base_sd = copy.deepcopy(model.state_dict())
    lorazoo.inject(model, "lora", targets=["q_proj", "v_proj"], r=2)
    sd = model.state_dict()
    for k, v in base_sd.items():
        assert torch.equal(sd[k], v), k
    extra = sorted(set(sd) - set(base_sd))
    assert extra == [
        "block.q_proj.adapters.default.lora_A",
        "block.q_proj.adapters.default.lora_B",
        "block.v_proj.adapters.default.lora_A",
        "block.v_proj.adapters.default.lora_B",
    ]
    result = model.load_state_dict(base_sd, strict=True)  # adapters keep their values
    assert result.missing_keys == [] and result.unexpected_keys == []
    with pytest.raises(RuntimeError, match="lm_head.weight"):
        broken = dict(base_sd)
        del broken["lm_head.weight"]
        model.load_state_dict(broken, strict=True)


def test_only_adapters_train_and_eject_restores_flags():
    model = Net()
    model.lm_head.weight.requires_grad_(False)  # a user choice that must survive
    lorazoo.inject(model, "lora", targets=["q_proj"], r=2)
    count = lorazoo.trainable(model)
    assert count.trainable == 2 * (16 + 24)
    assert str(count).startswith("trainable params: 80 || all params:")
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".adapters." not in n)
    lorazoo.eject(model)
    assert not model.lm_head.weight.requires_grad
    assert model.block.q_proj.weight.requires_grad and model.emb.weight.requires_grad


def _perturbed(variant="lora", dtype=torch.float32, **hyper):
    model = Net(dtype)
    lorazoo.inject(model, variant, targets=["q_proj", "v_proj"], r=4, alpha=8, **hyper)
    lorazoo.testing.perturb(model, 0)
    model.eval()
    return model


def test_merge_state_errors():
    model = _perturbed()
    x = torch.randn(5, 16)
    with pytest.raises(lorazoo.MergeError, match="nothing is merged"):
        lorazoo.unmerge(model)
    y = model(x)
    lorazoo.merge(model)
    with pytest.raises(lorazoo.MergeError, match="merging twice"):
        lorazoo.merge(model)
    # merged forward does not apply the adapter a second time
    assert (model(x) - y).abs().max() < 1e-4
    model.train()
    with pytest.raises(lorazoo.MergeError, match="unmerge"):
        model(x)
    with torch.no_grad():
        model(x)  # inference in train mode without gradients is fine


def test_adapter_changed_while_merged_unmerges_exactly():
    """The unmerge reverts the update that was merged, so changing the adapter while merged (an
    optimizer step) does not cost the base its exactness; the unmerged forward then uses the
    adapter as it is now."""
    model = _perturbed()
    before = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    lorazoo.merge(model)
    with torch.no_grad():
        model.block.q_proj.adapters["default"].lora_B.mul_(2)
    lorazoo.unmerge(model)
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.randn(4, 16)
    y = model(x)
    lorazoo.merge(model)  # the new adapter value merges as such
    assert (model(x) - y).abs().max() < 1e-4
    lorazoo.unmerge(model)


def test_base_changed_while_merged_refuses_exact_unmerge():
    model = _perturbed()
    before = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    lorazoo.merge(model)
    merged_w = model.block.q_proj.weight.detach().clone()
    with torch.no_grad():
        model.block.q_proj.weight.add_(0.5)
    with pytest.raises(lorazoo.MergeError, match="merged base weight changed while merged.*exact=False"):
        lorazoo.unmerge(model)
    assert model.block.q_proj.merged is not None and model.block.v_proj.merged is not None  # untouched
    with torch.no_grad():
        model.block.q_proj.weight.copy_(merged_w)  # what the merge wrote, under a new version
    lorazoo.unmerge(model)  # the contents are checked, not the version counter
    assert torch.equal(model.block.q_proj.weight, before["block.q_proj.weight"])
    assert torch.equal(model.block.v_proj.weight, before["block.v_proj.weight"])  # unchanged layer: exact


def test_exact_false_keeps_a_change_to_the_merged_weight():
    """The advice in the error is true: ``exact=False`` subtracts the merged update from the weight
    as it is, so a change made while merged survives and the rest is within rounding."""
    model = _perturbed()
    w0 = model.block.q_proj.weight.detach().clone()
    lorazoo.merge(model)
    with torch.no_grad():
        model.block.q_proj.weight[0, 0] += 1.0
    lorazoo.unmerge(model, exact=False)
    expect = w0.clone()
    expect[0, 0] += 1.0
    assert (model.block.q_proj.weight - expect).abs().max() < 1e-5


def test_disabled_gives_base_bitwise_and_set_active():
    model = Net()
    x = torch.randn(3, 16)
    base = model(x)
    lorazoo.inject(model, "lora", targets=["q_proj", "v_proj"], name="a", r=2)
    lorazoo.inject(model, "rslora", targets=["q_proj"], name="b", r=2)
    lorazoo.testing.perturb(model, 1)
    both = model(x)
    with lorazoo.disabled(model):
        assert torch.equal(model(x), base)
    assert torch.equal(model(x), both)
    lorazoo.set_active(model, "a")
    only_a = model(x)
    assert not torch.equal(only_a, both)
    with pytest.raises(lorazoo.LorazooError, match="no adapter named"):
        lorazoo.set_active(model, "c")
    lorazoo.eject(model, "a")
    assert lorazoo.adapter_names(model) == {"b": "rslora"}
    lorazoo.eject(model)
    assert torch.equal(model(x), base)


def test_duplicate_adapter_name_and_bad_names():
    model = Net()
    lorazoo.inject(model, "lora", targets=["q_proj"], r=2)
    before = state(model)
    with pytest.raises(lorazoo.LorazooError, match="already has an adapter named 'default'"):
        lorazoo.inject(model, "lora", targets=["v_proj"], r=2)
    for bad in ["", "a.b", "has space", "keys"]:
        with pytest.raises(lorazoo.ConfigError, match="not usable"):
            lorazoo.inject(model, "lora", targets=["v_proj"], r=2, name=bad)
    assert_same(before, model)


def test_param_groups_partition_and_optimizer_runs():
    model = _perturbed()
    model.lm_head.weight.requires_grad_(True)
    groups = lorazoo.param_groups(model, lr=1e-3, weight_decay=0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert {g["name"] for g in groups} == {"lora", "other"}
    opt = torch.optim.AdamW(groups)
    model.train()
    loss = model(torch.randn(4, 16)).pow(2).mean()
    loss.backward()
    opt.step()
    with pytest.raises(lorazoo.LorazooError, match="lr must be a positive number"):
        lorazoo.param_groups(model, lr=0)


def test_lora_initialisation():
    model = Net()
    lorazoo.inject(model, "lora", targets=["q_proj"], r=4, alpha=8)
    a = model.block.q_proj.adapters["default"]
    bound = 1 / math.sqrt(16)
    assert a.lora_A.shape == (4, 16) and a.lora_B.shape == (24, 4)
    top = float(a.lora_A.detach().abs().max())
    assert 0.5 * bound < top <= bound
    assert torch.count_nonzero(a.lora_B) == 0
    assert a.scale == 2.0


def test_rslora_scale_and_equivalence_to_scaled_lora():
    torch.manual_seed(0)
    r, alpha = 9, 6.0
    m1, m2 = Net(torch.float64), Net(torch.float64)
    lorazoo.inject(m1, "rslora", targets=["q_proj"], r=r, alpha=alpha)
    lorazoo.inject(m2, "lora", targets=["q_proj"], r=r, alpha=alpha * math.sqrt(r))
    a1, a2 = m1.block.q_proj.adapters["default"], m2.block.q_proj.adapters["default"]
    assert a1.scale == alpha / math.sqrt(r)
    with torch.no_grad():
        a1.lora_A.normal_()
        a1.lora_B.normal_()
        a2.lora_A.copy_(a1.lora_A)
        a2.lora_B.copy_(a1.lora_B)
    x = torch.randn(7, 16, dtype=torch.float64)
    y1, y2 = m1.block.q_proj(x), m2.block.q_proj(x)
    tau = merge_tolerance(x, m1.block.q_proj.weight, m1.block.q_proj.bias, [a1.lowrank()])
    assert bool(((y1 - y2).abs() <= tau).all())
    base = torch.nn.functional.linear(x, m1.block.q_proj.weight, m1.block.q_proj.bias)
    assert float((y1 - base).detach().abs().max()) > 0.1


def test_meta_device_injection():
    with torch.device("meta"):
        model = Net()
    lorazoo.inject(model, "lora", targets="all-linear", r=4)
    a = model.block.q_proj.adapters["default"]
    assert a.lora_A.device.type == "meta" and a.lora_A.shape == (4, 16)


def test_merge_report_counts_bytes():
    model = _perturbed(dtype=torch.bfloat16)
    lorazoo.merge(model)
    rep = lorazoo.merge_report(model)
    assert rep.layers == 2 and rep.elements == 2 * 16 * 24
    assert 0 < rep.bytes_held
    lorazoo.unmerge(model)
    assert lorazoo.merge_report(model).bytes_held == 0


def test_engine_writes_move_the_weight_version():
    """Merge, unmerge and base rewrites change the weight in place, so its version counter moves
    as for any in-place change: a cache keyed on it is invalidated, and a backward through a graph
    that saw the old weight refuses instead of using the wrong values."""
    model = nn.Sequential(nn.Linear(6, 5))
    lorazoo.inject(model, "lora", targets=["0"], r=2)
    host = model[0]
    with torch.no_grad():
        host.adapters["default"].lora_B.normal_()
    versions = [host.weight._version]
    model.eval()
    lorazoo.merge(model)
    versions.append(host.weight._version)
    lorazoo.unmerge(model)
    versions.append(host.weight._version)
    assert versions[0] < versions[1] < versions[2]
    host.patch_base("default", torch.ones(5, 1), torch.ones(1, 6))
    versions.append(host.weight._version)
    host.unpatch_base("default")
    versions.append(host.weight._version)
    assert versions[2] < versions[3] < versions[4]

    # A graph that saved the pre-merge weight (the input needs a gradient) cannot be run backward
    # after the weight was rewritten underneath it.
    x = torch.randn(3, 6, requires_grad=True)
    model.train()
    loss = model(x).sum()
    model.eval()
    lorazoo.merge(model)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    lorazoo.unmerge(model)
