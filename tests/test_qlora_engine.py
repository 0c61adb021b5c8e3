"""QLoRA in the engine: the NF4 layer kind (adapters on a 4-bit base), ``inject(..., "qlora")``
quantising its targets atomically, merge/unmerge/eject on packed storage (the packed bytes come
back bit for bit, also when interrupted), other variants on an NF4 base, and adapter files that
record and check the base recipe."""

from __future__ import annotations

import copy
import json
import struct

import pytest
import torch
from torch import nn

import lorazoo
import lorazoo.plugin
from lorazoo.engine import _interrupt
from lorazoo.errors import AdapterFileError, ConfigError, MergeError
from lorazoo.quant import NF4Linear, dequantize_nf4, quantize_nf4
from lorazoo.testing import merge_tolerance, perturb


class Interrupt(KeyboardInterrupt):
    pass


class Net(nn.Module):
    def __init__(self, dtype=torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(40, 72, dtype=dtype)
        self.down = nn.Linear(72, 24, bias=False, dtype=dtype)
        self.head = nn.Linear(24, 5, dtype=dtype)

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


def _x(dtype=torch.float32, n=6):
    return torch.randn(n, 40, generator=torch.Generator().manual_seed(9)).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _state(model: nn.Module):
    mods = [(n, type(m), id(m)) for n, m in model.named_modules()]
    return mods, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    (ma, sa), (mb, sb) = a, b
    return ma == mb and sa.keys() == sb.keys() and all(torch.equal(_bits(sa[k]), _bits(sb[k])) for k in sa)


def _interrupt_everywhere(monkeypatch, op, check_undone, check_done) -> int:
    """Run ``op`` with an interrupt at its k-th checkpoint, for every k; ``check_undone`` after
    each; then once through (``check_done``). Returns the number of checkpoints."""
    calls = [0]
    monkeypatch.setattr(_interrupt, "checkpoint", lambda: calls.__setitem__(0, calls[0] + 1))
    probe = op(dry=True)
    monkeypatch.setattr(_interrupt, "checkpoint", lambda: None)
    total = calls[0]
    assert total >= 2, "too few checkpoints to test"
    del probe
    for k in range(1, total + 1):
        seen = [0]

        def fail(k=k, seen=seen) -> None:
            seen[0] += 1
            if seen[0] == k:
                raise Interrupt(f"checkpoint {k}")

        monkeypatch.setattr(_interrupt, "checkpoint", fail)
        with pytest.raises(Interrupt):
            op(dry=False)
        monkeypatch.setattr(_interrupt, "checkpoint", lambda: None)
        check_undone(k)
    op(dry=False)
    check_done()
    return total


# ---- inject ------------------------------------------------------------------------------------


def test_inject_quantises_and_attaches_in_one_step(monkeypatch):
    model = Net()
    before = _state(model)
    dense = {n: m.weight.detach().clone() for n, m in model.named_children()}

    def op(dry):
        target = copy.deepcopy(model) if dry else model
        lorazoo.inject(target, "qlora", targets=["up", "down"], r=4, alpha=8)
        return target

    def undone(k):
        assert _same(_state(model), before), f"interrupted at checkpoint {k}, the model changed"
        assert not lorazoo.adapter_names(model)

    def done():
        for n in ("up", "down"):
            h = getattr(model, n)
            assert h.kind.name == "nf4" and h.kind.storage == "nf4"
            q = quantize_nf4(dense[n])
            assert torch.equal(h.weight_codes, q.codes) and torch.equal(h.weight_absmax, q.absmax)
            assert torch.equal(h.weight, dequantize_nf4(q))
        assert type(model.head) is nn.Linear
        assert lorazoo.adapter_names(model) == {"default": "qlora"}

    _interrupt_everywhere(monkeypatch, op, undone, done)


def test_layer_info_says_nf4_and_holds_the_dequantised_weight(monkeypatch):
    seen = []
    cls = lorazoo.variant("qlora")
    orig = cls.check_layer.__func__

    def spy(c, layer, config):
        seen.append(layer)
        return orig(c, layer, config)

    monkeypatch.setattr(cls, "check_layer", classmethod(spy))
    model = Net()
    w = model.up.weight.detach().clone()
    lorazoo.inject(model, "qlora", targets=["up"], r=2)
    (info,) = seen
    assert info.storage == "nf4" and info.kind == "linear" and (info.d_out, info.d_in) == (72, 40)
    assert torch.equal(info.weight, dequantize_nf4(quantize_nf4(w)))


def test_qlora_refuses_what_it_cannot_quantise_before_any_change():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4))
    before = _state(model)
    with pytest.raises(ConfigError):
        lorazoo.inject(model, "qlora", targets=["0", "1"], r=2)
    assert _same(_state(model), before)
    # a dense layer that already carries adapters (trained on the dense weight)
    model = Net()
    lorazoo.inject(model, "lora", targets=["up"], r=2, name="a")
    before = _state(model)
    with pytest.raises(ConfigError, match="already carries adapters"):
        lorazoo.inject(model, "qlora", targets=["up"], r=2, name="b")
    assert _same(_state(model), before)


def test_olora_on_an_nf4_base_is_refused_clearly():
    model = Net()
    lorazoo.quantize(model, targets=["up"])
    before = _state(model)
    with pytest.raises(ConfigError, match="rewrites the base weight.*nf4 layers"):
        lorazoo.inject(model, "olora", targets=["up"], r=2)
    assert _same(_state(model), before)


# ---- forward, training -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_init_identity_and_training_reaches_only_the_adapters(dtype):
    model = Net(dtype)
    lorazoo.quantize(model)
    x = _x(dtype)
    with torch.no_grad():
        base = model(x)
    packed = _state(model)[1]
    lorazoo.inject(model, "qlora", targets=["up", "down"], r=4, alpha=8)
    with torch.no_grad():
        assert torch.equal(_bits(model(x)), _bits(base))
    opt = torch.optim.AdamW(lorazoo.param_groups(model, lr=1e-2))
    losses = []
    for _ in range(4):
        loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".adapters." in n for n in trained)
    after = model.state_dict()
    for k, v in packed.items():
        assert torch.equal(_bits(after[k]), _bits(v)), k


# ---- merge, unmerge, eject -----------------------------------------------------------------------


def _adapted(variant="qlora", dtype=torch.float32, **hyper):
    model = Net(dtype)
    if variant != "qlora":
        lorazoo.quantize(model)
    lorazoo.inject(model, variant, targets=["up", "down"], **({"r": 4, "alpha": 8} | hyper))
    perturb(model, 3)
    model.eval()
    return model


@pytest.mark.parametrize("variant", ["qlora", "dora", "rslora", "vera"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_holds_cast_of_dequant_plus_delta_and_unmerge_gives_the_packed_bytes_back(variant, dtype):
    model = _adapted(variant, dtype)
    x = _x(dtype)
    before = _state(model)
    views = {n: getattr(model, n).weight.detach().clone() for n in ("up", "down")}
    with torch.no_grad():
        unmerged = model(x)
        lorazoo.merge(model)
        merged = model(x)
    for n in ("up", "down"):
        h = getattr(model, n)
        sd = h.state_dict()
        assert "weight" in sd and "weight_codes" not in sd  # the state dict holds the dense weight
        assert h.weight_codes is before[1][f"{n}.weight_codes"] or torch.equal(
            h.weight_codes, before[1][f"{n}.weight_codes"]
        )
    # each layer merged vs unmerged within the tolerance model, relative to the dequantised weight
    h = model.up
    xs = x
    tau = merge_tolerance(
        xs, views["up"], h.bias, [h.adapters[a].lowrank(views["up"]) for a in h.active], dtype
    )
    with torch.no_grad():
        y_m = h(xs)
        lorazoo.unmerge(model)
        y_u = h(xs)
    assert bool(((y_m.double() - y_u.double()).abs() <= tau).all())
    assert _same(_state(model), before)
    with torch.no_grad():
        assert torch.equal(_bits(model(x)), _bits(unmerged))
    assert merged.shape == unmerged.shape


def test_merge_and_unmerge_are_all_or_nothing_when_interrupted(monkeypatch):
    model = _adapted()
    unmerged = _state(model)

    def op(dry):
        lorazoo.merge(copy.deepcopy(model) if dry else model)

    def undone(k):
        assert _same(_state(model), unmerged), f"merge interrupted at {k} left a change"
        assert all(h.merged is None for _, h in lorazoo.plugin.adapted_layers(model))

    _interrupt_everywhere(monkeypatch, op, undone, lambda: None)
    merged = _state(model)
    assert "up.weight" in merged[1]

    def op2(dry):
        lorazoo.unmerge(copy.deepcopy(model) if dry else model)

    def undone2(k):
        assert _same(_state(model), merged), f"unmerge interrupted at {k} left a change"

    _interrupt_everywhere(monkeypatch, op2, undone2, lambda: None)
    assert _same(_state(model), unmerged)


def test_eject_leaves_the_nf4_layers_with_their_bytes():
    model = Net()
    lorazoo.quantize(model)
    assert type(model.head) is nn.Linear  # "all-linear" leaves the output head dense
    originals = {n: getattr(model, n) for n in ("up", "down")}
    packed = _state(model)
    lorazoo.inject(model, "qlora", targets=["up", "down"], r=4)
    perturb(model, 1)
    lorazoo.merge(model)
    lorazoo.eject(model)
    for n, m in originals.items():
        assert getattr(model, n) is m and not m.holds_dense
    assert _same(_state(model), packed)


def test_eject_after_qlora_on_a_dense_model_leaves_nf4_and_dequantize_gives_linear():
    model = Net()
    lorazoo.inject(model, "qlora", targets=["up"], r=2)
    with pytest.raises(MergeError, match="carry adapters"):
        lorazoo.dequantize(model)
    lorazoo.eject(model)
    assert isinstance(model.up, NF4Linear)
    w = model.up.dequantized_weight()
    assert lorazoo.dequantize(model) == ["up"]
    assert type(model.up) is nn.Linear and torch.equal(model.up.weight, w)


def test_cast_while_merged_keeps_the_packed_storage():
    model = _adapted()
    codes = {n: getattr(model, n).weight_codes.clone() for n in ("up", "down")}
    absmax = {n: getattr(model, n).weight_absmax_scale.clone() for n in ("up", "down")}
    lorazoo.merge(model)
    model.to(torch.bfloat16)
    for n in ("up", "down"):
        h = getattr(model, n)
        assert h.weight.dtype == torch.bfloat16 and h.weight_dtype == torch.bfloat16
        assert h.weight_absmax_scale.dtype == torch.float32
        assert torch.equal(h.weight_absmax_scale, absmax[n])
    lorazoo.unmerge(model)
    for n in ("up", "down"):
        h = getattr(model, n)
        assert torch.equal(h.weight_codes, codes[n]) and not h.holds_dense
        assert h.weight.dtype == torch.bfloat16


def test_changed_merged_weight_refuses_exact_unmerge():
    model = _adapted()
    packed = _state(model)
    lorazoo.merge(model)
    with torch.no_grad():
        model.up.weight.add_(1.0)
    with pytest.raises(MergeError, match="changed while merged"):
        lorazoo.unmerge(model)
    lorazoo.unmerge(model, exact=False)  # an NF4 base cannot keep the change: the packed base returns
    assert _same(_state(model), packed)


# ---- files ---------------------------------------------------------------------------------------


def test_load_onto_a_fresh_dense_base_quantises_it_and_reproduces_the_outputs(tmp_path):
    model = Net()
    fresh = copy.deepcopy(model)
    x = _x()
    lorazoo.inject(model, "qlora", targets=["up", "down"], r=4, alpha=8)
    opt = torch.optim.AdamW(lorazoo.param_groups(model, lr=1e-2))
    for _ in range(4):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        y = model(x)
    path = lorazoo.save(model, tmp_path / "q.safetensors")
    header = json.loads(path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    doc = json.loads(header["__metadata__"]["lorazoo.adapter"])
    for n in ("up", "down"):
        base = doc["modules"][n]["base"]
        assert (base["storage"], base["block_size"], base["double_quant"]) == ("nf4", 64, True)
        assert "fingerprint" not in base  # the recipe, not the bytes (as for a dense base)
    assert not any("weight_codes" in k for k in header)  # the adapter file holds the adapter only
    lorazoo.load(fresh, path)
    fresh.eval()
    assert fresh.up.kind.name == "nf4" and type(fresh.head) is nn.Linear
    with torch.no_grad():
        assert torch.equal(_bits(fresh(x)), _bits(y))


def test_load_checks_the_base_recipe_and_bytes(tmp_path):
    model = Net()
    lorazoo.quantize(model, targets=["up", "down"])
    lorazoo.inject(model, "dora", targets=["up", "down"], r=2)
    perturb(model, 2)
    path = lorazoo.save(model, tmp_path / "d.safetensors")
    # a dense base: the file says it was trained on NF4
    dense = Net()
    before = _state(dense)
    with pytest.raises(AdapterFileError, match="stored as nf4.*is dense"):
        lorazoo.load(dense, path)
    assert _same(_state(dense), before)
    # another recipe
    other = Net()
    lorazoo.quantize(other, targets=["up", "down"], double_quant=False)
    with pytest.raises(AdapterFileError, match="double_quant"):
        lorazoo.load(other, path)
    # other weights under the same recipe load, as an adapter loads onto any dense base of its shape
    other = Net()
    with torch.no_grad():
        other.up.weight.mul_(1.5)
    lorazoo.quantize(other, targets=["up", "down"])
    lorazoo.load(other, path)
    assert lorazoo.adapter_names(other) == {"default": "dora"}
    # the right base
    same = Net()
    lorazoo.quantize(same, targets=["up", "down"])
    lorazoo.load(same, path)
    x = _x()
    model.eval()
    same.eval()
    with torch.no_grad():
        assert torch.equal(_bits(same(x)), _bits(model(x)))
