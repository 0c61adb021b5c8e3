"""transformers' ``Conv1D`` (GPT-2's projections, weight stored ``in × out``) as a layer kind:
``"all-linear"`` picks it (not the output head), every built-in variant matches a reference
computed by hand from its ``delta_weight``, merge/unmerge/eject are bit-exact, and LoRA gives
PEFT's outputs on the same weights."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import lorazoo
from lorazoo.testing import perturb

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

PROJ = ("c_attn", "c_proj", "c_fc")


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


def _bits(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".adapters." not in k}


def _same(before: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    after = model.state_dict()
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k].view(torch.int32), v.view(torch.int32)), k


def hyper(variant: str) -> dict:
    cls = lorazoo.variant(variant)
    return {"r": 4, "alpha": 8, **cls.example_config}


def test_all_linear_selects_the_conv1d_projections_not_the_head():
    model = tiny_gpt2()
    lorazoo.inject(model, "lora", targets="all-linear", r=4)
    adapted = sorted(p for p, _ in lorazoo.engine.hosts(model))
    layers = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    want = sorted(f"transformer.h.{i}.{m}" for i in range(2) for m in layers)
    assert adapted == want
    host = model.transformer.h[0].attn.c_attn
    assert isinstance(host, lorazoo.AdaptedConv1D)
    assert (host.in_features, host.out_features) == (32, 96)
    assert tuple(host.stored_weight.shape) == (32, 96) and tuple(host.weight.shape) == (96, 32)
    # the state dict keeps Conv1D's key and layout
    assert tuple(model.state_dict()["transformer.h.0.attn.c_attn.weight"].shape) == (32, 96)


def test_conv1d_base_output_unchanged_and_transformers_not_imported_by_lorazoo():
    model = tiny_gpt2()
    x = ids()
    with torch.no_grad():
        y0 = model(x).logits
        lorazoo.inject(model, "lora", targets="all-linear", r=4)
        with lorazoo.disabled(model):
            y1 = model(x).logits
    assert torch.equal(y0, y1), "an adapted Conv1D with nothing active must give Conv1D's bits"
    code = "import sys, lorazoo; lorazoo.layer_kinds(); assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("variant", lorazoo.variants())
def test_each_variant_matches_reference_and_merges_exactly(variant):
    model = tiny_gpt2()
    x = ids()
    before = _bits(model)
    if getattr(lorazoo.variant(variant), "base_storage", "dense") != "dense":
        # QLoRA quantises nn.Linear targets only: a Conv1D base is refused, with nothing changed
        with pytest.raises(lorazoo.ConfigError, match="reaches it stored as 'dense'"):
            lorazoo.inject(model, variant, targets="all-linear", **hyper(variant))
        _same(before, model)
        assert not lorazoo.engine.hosts(model)
        return
    lorazoo.inject(model, variant, targets="all-linear", **hyper(variant))
    perturb(model, seed=3)
    injected = _bits(model)  # OLoRA rewrites the base until eject
    hosts = lorazoo.engine.hosts(model)
    seen: dict[str, torch.Tensor] = {}
    handles = [
        h.register_forward_hook(lambda m, inp, out, p=p: seen.__setitem__(p, (inp[0].detach(), out.detach())))
        for p, h in hosts
    ]
    with torch.no_grad():
        unmerged = model(x).logits
    for hd in handles:
        hd.remove()
    for path, host in hosts:
        xin, out = seen[path]
        w = host.stored_weight.detach().double().t()  # d_out × d_in, by hand from Conv1D's layout
        adapter = host.adapters["default"]
        with torch.no_grad():
            merged_w = w + adapter.delta_weight(w)
        ref = xin.double() @ merged_w.t() + host.bias.double()
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5, msg=f"{variant} {path}")
    with torch.no_grad():
        lorazoo.merge(model)
        merged = model(x).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    lorazoo.unmerge(model)
    _same(injected, model)
    lorazoo.merge(model)
    lorazoo.eject(model)
    _same(before, model)
    assert all(isinstance(model.transformer.h[i].attn.c_attn, Conv1D) for i in range(2))
    assert not lorazoo.engine.hosts(model)


def test_lora_on_conv1d_matches_peft():
    peft = pytest.importorskip("peft")
    base = tiny_gpt2()
    x = ids()
    ours = copy.deepcopy(base)
    lorazoo.inject(ours, "lora", targets="all-linear", r=4, alpha=8)
    perturb(ours, seed=5)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(PROJ), fan_in_fan_out=True, lora_dropout=0.0)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    sd = {}
    for path, host in lorazoo.engine.hosts(ours):
        a = host.adapters["default"]
        sd[f"base_model.model.{path}.lora_A.default.weight"] = a.lora_A.detach()
        sd[f"base_model.model.{path}.lora_B.default.weight"] = a.lora_B.detach()
    missing = set(sd) - set(theirs.state_dict())
    assert not missing, sorted(missing)[:3]
    theirs.load_state_dict(sd, strict=False)
    with torch.no_grad():
        y_ours, y_theirs = ours(x).logits, theirs(x).logits
    assert not torch.allclose(y_ours, base(x).logits), "the adapters must have an effect"
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)


def test_dora_norm_is_per_output_feature_on_conv1d():
    model = tiny_gpt2()
    lorazoo.inject(model, "dora", targets=["c_attn"], r=4)
    host = model.transformer.h[0].attn.c_attn
    m = host.adapters["default"].lora_magnitude_vector
    assert m.shape == (96,)
    torch.testing.assert_close(m.detach(), host.stored_weight.detach().norm(dim=0))
