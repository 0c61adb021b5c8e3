"""``nn.Conv1d`` / ``nn.Conv2d`` layer kinds: PEFT's conv LoRA layout, exact merges, variants.

The conv kinds also run the per-kind conformance check for every variant in
tests/test_properties.py ("kinds"). Here: what is refused and why, targeting, the forward against
a convolution with the merged weight over stride, padding and dilation, DoRA's per-channel norm,
PEFT folders both ways against the installed PEFT, and a small CNN's full round trip (inject,
train 20 steps, save in both formats, reload, merge / unmerge / eject bit for bit).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorazoo
import lorazoo.peft_format
from lorazoo.engine.host import AdaptedLayer
from lorazoo.engine.kinds.conv import AdaptedConv1d, AdaptedConv2d
from lorazoo.testing import merge_tolerance


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    ).eval()


def images(seed: int = 1, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def hosts(model: nn.Module) -> dict[str, AdaptedLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def bits(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous().view(torch.uint8) for k, v in model.state_dict().items()}


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def perturb(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for h in hosts(model).values():
            for p in h.adapters.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


# --------------------------------------------------------------------------------------------
# Recognition, refusals, targeting
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "reason"),
    [
        (nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
        (nn.Conv1d(4, 4, 3, groups=4), "groups=4"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
        (nn.Conv1d(4, 4, 3, padding=1, padding_mode="circular"), "padding_mode='circular'"),
    ],
)
def test_unsupported_convolutions_are_refused_with_the_reason(layer, reason):
    model = nn.Sequential(layer)
    before = bits(model)
    with pytest.raises(lorazoo.TargetError, match=reason):
        lorazoo.inject(model, "lora", targets=["0"], r=2)
    assert model[0] is layer
    same_bits(bits(model), before)


def test_all_linear_leaves_convolutions_out_and_names_or_types_select_them():
    model = cnn()
    lorazoo.inject(model, "lora", targets="all-linear", r=2)
    assert set(hosts(model)) == {"6"}  # the one linear layer, none of the convolutions
    model = cnn()
    model.append(nn.Linear(5, 5))
    lorazoo.inject(model, "lora", targets="all-linear", r=2)
    assert set(hosts(model)) == {"6"}  # the output head "7" is left out, as always
    model = cnn()
    lorazoo.inject(model, "lora", targets=nn.Conv2d, r=2)
    assert set(hosts(model)) == {"0", "2", "4"}
    assert all(isinstance(h, AdaptedConv2d) for h in hosts(model).values())
    lorazoo.inject(model, "dora", targets=nn.Conv2d, r=2, name="second")  # wrapped: still Conv2d
    assert all(set(h.adapters) == {"default", "second"} for h in hosts(model).values())
    model = cnn()
    lorazoo.inject(model, "lora", targets=["2"], r=2)
    assert set(hosts(model)) == {"2"}
    h = hosts(model)["2"]
    assert (h.out_features, h.in_features) == (8, 8 * 9)
    assert h.weight_view().shape == (8, 72) and h.weight_view().data_ptr() == h.weight.data_ptr()


@pytest.mark.parametrize("variant", ["vera", "adalora"])
def test_variants_without_conv_support_are_refused_by_name(variant):
    model = cnn()
    before = bits(model)
    with pytest.raises(lorazoo.ConfigError, match=f"variant {variant!r} does not adapt conv layers"):
        lorazoo.inject(model, variant, targets=nn.Conv2d, r=2)
    same_bits(bits(model), before)
    assert not hosts(model)


def test_peft_layout_of_the_factors():
    model = cnn()
    lorazoo.inject(model, "lora", targets=["0"], r=3)
    a = hosts(model)["0"].adapters["default"]
    assert a.lora_A.shape == (3, 3 * 9) and a.lora_B.shape == (8, 3)


# --------------------------------------------------------------------------------------------
# Forward = convolution with the merged weight, over stride / padding / dilation
# --------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    spatial=st.sampled_from([1, 2]),
    c_in=st.integers(1, 5),
    c_out=st.integers(1, 6),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    r=st.integers(1, 3),
    variant=st.sampled_from(["lora", "rslora", "dora", "olora"]),
    seed=st.integers(0, 1000),
)
def test_unmerged_forward_equals_convolution_with_merged_weight(
    spatial, c_in, c_out, k, stride, padding, dilation, r, variant, seed
):
    torch.manual_seed(seed)
    cls = nn.Conv2d if spatial == 2 else nn.Conv1d
    conv = cls(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation)
    r = min(r, c_out, c_in * k**spatial)
    model = nn.Sequential(conv)
    lorazoo.inject(model, variant, targets=["0"], r=r, alpha=2.0)
    perturb(model, seed)
    host = hosts(model)["0"]
    assert isinstance(host, AdaptedConv2d if spatial == 2 else AdaptedConv1d)
    size = (7, 6) if spatial == 2 else (9,)
    x = torch.randn(2, c_in, *size)
    adapter = host.adapters["default"]
    with torch.no_grad():
        got = model(x)
        view = host.weight_view().detach()
        w = view.double() + adapter.delta_weight(view).double()
        fn = F.conv2d if spatial == 2 else F.conv1d
        want = fn(x.double(), w.view(host.weight.shape), host.bias.double(), stride, padding, dilation)
        tau = merge_tolerance(
            host.kind.dense_input(host, x), view, host.bias, [adapter.lowrank(view)], view.dtype
        )
        err = (host.kind.dense_output(host, got).double() - host.kind.dense_output(host, want)).abs()
        assert bool((err <= tau).all()), float(err.max())
        before = bits(model)
        lorazoo.merge(model)
        merged = model(x)
        lorazoo.unmerge(model)
        same_bits(bits(model), before)
        err = (host.kind.dense_output(host, merged).double() - host.kind.dense_output(host, want)).abs()
        assert bool((err <= 2 * tau).all())


def test_dropout_applies_to_the_adapter_input_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    lorazoo.inject(model, "lora", targets=["0"], r=2, dropout=0.5)
    perturb(model)
    host = hosts(model)["0"]
    a = host.adapters["default"]
    x = images()
    model.train()
    torch.manual_seed(5)
    got = model(x)
    torch.manual_seed(5)
    xd = F.dropout(x, 0.5, training=True)
    h = F.conv2d(xd, a.lora_A.view(2, 3, 3, 3), padding=1)
    want = model[0].base_forward(x) + a.scale * F.conv2d(h, a.lora_B.view(4, 2, 1, 1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_two_adapters_and_a_routed_batch():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    lorazoo.inject(model, "lora", targets=["0"], r=2, name="a")
    lorazoo.inject(model, "dora", targets=["0"], r=2, name="b")
    perturb(model)
    x = images()
    with torch.no_grad():
        lorazoo.set_active(model, ["a"])
        ya = model(x)
        lorazoo.set_active(model, ["b"])
        yb = model(x)
        lorazoo.set_active(model, [])
        y0 = model(x)
        lorazoo.set_active(model, ["a", "b"])
        both = model(x)
        torch.testing.assert_close(both - y0, (ya - y0) + (yb - y0), rtol=1e-4, atol=1e-5)
        with lorazoo.route(model, ["a", "b", None, "a"]):
            routed = model(x)
    torch.testing.assert_close(routed[[0, 3]], ya[[0, 3]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routed[1], yb[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(routed[2], y0[2])


# --------------------------------------------------------------------------------------------
# DoRA: the norm per output channel over in·k…, trained magnitude
# --------------------------------------------------------------------------------------------


def test_dora_norm_runs_per_output_channel_and_magnitude_trains():
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1))
    w = model[0].weight.detach().clone()
    lorazoo.inject(model, "dora", targets=["0"], r=2)
    a = hosts(model)["0"].adapters["default"]
    torch.testing.assert_close(a.lora_magnitude_vector.detach(), w.flatten(1).norm(dim=1))
    model.train()
    model(images()).pow(2).mean().backward()
    assert a.lora_magnitude_vector.grad is not None and a.lora_magnitude_vector.grad.abs().sum() > 0
    assert a.lora_B.grad.abs().sum() > 0


def test_dora_with_dropout_in_training_recomputes_the_base_on_the_dropped_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1))
    lorazoo.inject(model, "dora", targets=["0"], r=2, dropout=0.3)
    perturb(model)
    host = hosts(model)["0"]
    a = host.adapters["default"]
    x = torch.randn(2, 3, 10)
    model.train()
    torch.manual_seed(7)
    got = model(x)
    torch.manual_seed(7)
    xd = F.dropout(x, 0.3, training=True)
    view = host.weight_view().detach()
    k = (a.lora_magnitude_vector / (view + a.scale * a.lora_B @ a.lora_A).norm(dim=1).detach()).view(-1, 1)
    z = F.conv1d(xd, host.weight, None, 1, 1)
    lr = a.scale * F.conv1d(F.conv1d(xd, a.lora_A.view(2, 3, 3), None, 1, 1), a.lora_B.view(4, 2, 1))
    want = F.conv1d(x, host.weight, host.bias, 1, 1) + (k - 1) * z + k * lr
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# PEFT folders against the installed PEFT
# --------------------------------------------------------------------------------------------


def _peft():
    return pytest.importorskip("peft")


def cnn1d() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv1d(6, 4, 2, stride=2)).eval()


NETS = {"conv2d": (cnn, lambda: images(9)), "conv1d": (cnn1d, lambda: torch.randn(3, 3, 12))}


def _layer_close(host, x, want) -> None:
    with torch.no_grad():
        got = host(x)
    view = host.weight_view().detach()
    tau = merge_tolerance(
        host.kind.dense_input(host, x), view, host.bias, [host.adapters["default"].lowrank(view)]
    )
    err = (host.kind.dense_output(host, got).double() - host.kind.dense_output(host, want).double()).abs()
    assert bool((err <= tau).all()), f"max error {float(err.max()):.3g} over τ {float(tau.max()):.3g}"


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("flags", [{}, {"use_rslora": True}, {"use_dora": True}])
def test_peft_made_conv_adapter_loads_with_equal_outputs(tmp_path, net, flags):
    peft = _peft()
    build, inp = NETS[net]
    targets = ["0", "2"]
    pm = peft.get_peft_model(build(), peft.LoraConfig(r=2, lora_alpha=5, target_modules=targets, **flags))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    model = build()
    lorazoo.load(model, tmp_path / "peft")
    want_variant = "dora" if flags.get("use_dora") else "rslora" if flags.get("use_rslora") else "lora"
    assert lorazoo.adapter_names(model) == {"default": want_variant}
    inner = pm.base_model.model
    for path in targets:
        peft_layer = inner.get_submodule(path)
        host = model.get_submodule(path)
        x = torch.randn(2, host.in_channels, *((6, 5) if net == "conv2d" else (9,)))
        with torch.no_grad():
            want = peft_layer(x)
        _layer_close(host, x, want)
    x = inp()
    with torch.no_grad():
        torch.testing.assert_close(model(x), pm(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora", "olora", "loraplus"])
def test_lorazoo_conv_export_loads_into_peft(tmp_path, net, variant):
    peft = _peft()
    build, inp = NETS[net]
    model = build()
    lorazoo.inject(model, variant, targets=["0", "2"], r=2, alpha=3.0)
    perturb(model)
    lorazoo.save(model, tmp_path / "out", format="peft")
    from safetensors.torch import load_file

    raw = load_file(tmp_path / "out" / "adapter_model.safetensors")
    conv = model.get_submodule("0").weight
    r = 4 if variant == "olora" else 2  # OLoRA is written as its rank-2r plain LoRA
    assert raw["base_model.model.0.lora_A.weight"].shape == (r, *conv.shape[1:])
    assert raw["base_model.model.0.lora_B.weight"].shape == (conv.shape[0], r, *(1,) * (conv.dim() - 2))
    pm = peft.PeftModel.from_pretrained(build(), tmp_path / "out").eval()
    x = inp()
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x), rtol=1e-5, atol=1e-5)
        for path in ("0", "2"):
            host = model.get_submodule(path)
            xi = torch.randn(2, host.in_channels, *((6, 5) if net == "conv2d" else (9,)))
            if variant == "olora":  # relative to the rewritten base: compare outputs only
                torch.testing.assert_close(host(xi), pm.base_model.model.get_submodule(path)(xi))
            else:
                _layer_close(host, xi, pm.base_model.model.get_submodule(path)(xi))


def test_lorazoo_file_with_conv_needs_its_model_for_peft(tmp_path):
    model = cnn()
    lorazoo.inject(model, "lora", targets=["0"], r=2)
    lorazoo.save(model, tmp_path / "a.safetensors")
    with pytest.raises(lorazoo.LorazooError, match="kernel shape"):
        lorazoo.peft_format.convert(tmp_path / "a.safetensors", tmp_path / "peft", to="peft")
    assert not (tmp_path / "peft").exists()


# --------------------------------------------------------------------------------------------
# A small CNN, end to end
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_cnn():
    model = cnn()
    lorazoo.inject(model, "lora", targets=nn.Conv2d, r=2, alpha=4)
    lorazoo.modules_to_save(model, ["6"])
    model.train()
    opt = torch.optim.AdamW(lorazoo.param_groups(model, lr=1e-2))
    for step in range(20):
        x = images(step, 8)
        target = torch.arange(8) % 5
        loss = F.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_cnn_training_moved_the_adapters_not_the_base(trained_cnn):
    base = cnn()
    own = lorazoo.base_state_dict(trained_cnn)
    for k, v in base.state_dict().items():
        assert torch.equal(own[k], v), k
    with torch.no_grad():
        assert (trained_cnn(images(99)) - base(images(99))).abs().max() > 1e-3


@pytest.mark.parametrize("fmt", ["lorazoo", "peft"])
def test_cnn_save_and_reload_into_a_fresh_model(trained_cnn, fmt, tmp_path):
    path = tmp_path / ("a.safetensors" if fmt == "lorazoo" else "folder")
    lorazoo.save(trained_cnn, path, format=fmt)
    fresh = cnn()
    lorazoo.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(images(99)), trained_cnn(images(99)))


def test_cnn_merge_unmerge_eject_bit_exact_and_merge_and_unload(trained_cnn):
    model = copy.deepcopy(trained_cnn)
    before = bits(model)
    x = images(99)
    with torch.no_grad():
        y = model(x)
        lorazoo.merge(model)
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)
        lorazoo.unmerge(model)
        same_bits(bits(model), before)
        assert torch.equal(model(x), y)
        plain = lorazoo.merge_and_unload(copy.deepcopy(model))
        assert [type(m) for m in plain.modules()] == [type(m) for m in cnn().modules()]
        torch.testing.assert_close(plain(x), y, rtol=1e-4, atol=1e-5)
        lorazoo.merge(model)
        lorazoo.eject(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in cnn().modules()]
    same_bits(bits(model), bits(cnn()))
