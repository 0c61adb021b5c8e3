"""PEFT folders on transformers' Conv1D (``fan_in_fan_out``) and PEFT's AdaLoRA (``rank_pattern``).

The fixture tests (``tests/data/peft/lora_conv1d``, ``adalora``, ``adalora_unmasked``, made by
PEFT) run without PEFT; the others compare both directions against the installed PEFT on a tiny
GPT-2 (Conv1D projections) and a tiny Llama, built from configs.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorazoo
from lorazoo import AdapterFileError
from lorazoo.engine.inject import adapters_named
from lorazoo.engine.layer import layer_kind
from lorazoo.testing import merge_tolerance

DATA = Path(__file__).parent / "data" / "peft"


def _fixtures_module():
    spec = importlib.util.spec_from_file_location("make_fixtures_fan", DATA / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FIX = _fixtures_module()


def fixture_model(case: str) -> nn.Module:
    if case in FIX.NEEDS_TRANSFORMERS:
        pytest.importorskip("transformers")
    model = FIX.BUILDERS[case]()
    model.load_state_dict(load_file(DATA / case / "base.safetensors"))
    return model.eval()


def copy_case(case: str, tmp_path: Path, **config_changes) -> Path:
    folder = tmp_path / case
    shutil.copytree(DATA / case, folder)
    if config_changes:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg.update(config_changes)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert list(now) == list(before)
    assert all(torch.equal(now[k], v) for k, v in before.items())
    assert lorazoo.adapter_names(model) == {}


def ranks(model: nn.Module) -> dict[str, int]:
    return {p: a.rank for p, _, a in adapters_named(model, "default")}


# --------------------------------------------------------------------------------------------
# Fixtures (no PEFT needed)
# --------------------------------------------------------------------------------------------


def test_adalora_fixture_keeps_peft_final_ranks_and_does_not_allocate_again():
    cfg = json.loads((DATA / "adalora" / "adapter_config.json").read_text())
    kept = {k[: -len(".lora_E")]: sum(v) for k, v in cfg["rank_pattern"].items()}
    assert len(set(kept.values())) > 1, "the fixture's final mask gives layers different ranks"
    model = fixture_model("adalora")
    lorazoo.load(model, DATA / "adalora")
    assert ranks(model) == kept
    shared = adapters_named(model, "default")[0][2].shared
    assert shared.frozen  # a file cut by the final mask is not masked again


def test_adalora_fixture_without_rank_pattern_keeps_init_r():
    cfg = json.loads((DATA / "adalora_unmasked" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] is None
    model = fixture_model("adalora_unmasked")
    lorazoo.load(model, DATA / "adalora_unmasked")
    assert set(ranks(model).values()) == {cfg["init_r"]}


def test_rank_pattern_over_uncut_tensors_keeps_the_patterns_rows(tmp_path):
    # Full init_r tensors with a rank_pattern (PEFT cuts them when it loads): lorazoo keeps the
    # pattern's rows, which computes what zeroing the other λ computes.
    pattern = {"0.lora_E": [True, False, True], "2.lora_E": [False, False, False], "4.lora_E": [True] * 3}
    folder = copy_case("adalora_unmasked", tmp_path, rank_pattern=pattern)
    model = fixture_model("adalora_unmasked")
    lorazoo.load(model, folder)
    assert ranks(model) == {"0": 2, "2": 0, "4": 3}
    masked = fixture_model("adalora_unmasked")
    lorazoo.load(masked, DATA / "adalora_unmasked")
    with torch.no_grad():
        for p, _, a in adapters_named(masked, "default"):
            keep = torch.tensor(pattern[f"{p}.lora_E"]).view(-1, 1)
            a.lora_E.masked_fill_(~keep, 0.0)
    x = torch.randn(7, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"rank_pattern": {"0.lora_E": [True, False]}}, "keeps 1 of 2 ranks by rank_pattern"),
        ({"rank_pattern": {"9.lora_E": [True, True, True]}}, r"rank_pattern names \['9'\]"),
        ({"rank_pattern": {"0.lora_A": [True, True, True]}}, "is not AdaLoRA's form"),
        ({"rank_pattern": {"0.lora_E": [1, 0, 1]}}, "is not AdaLoRA's form"),
        ({"rank_pattern": [1]}, "rank_pattern must map modules"),
        ({"alpha_pattern": {"2": 3}}, "alpha_pattern"),
        ({"use_dora": True}, "use_dora=true on an AdaLoRA adapter"),
        ({"init_r": 2}, r"k <= init_r=2"),
        ({"init_r": "3"}, "init_r must be a positive integer"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ],
)
def test_unmappable_adalora_folders_are_refused_and_leave_the_model(tmp_path, changes, match):
    folder = copy_case("adalora_unmasked", tmp_path, **changes)
    model = fixture_model("adalora_unmasked")
    before = state(model)
    with pytest.raises(AdapterFileError, match=match):
        lorazoo.load(model, folder)
    assert_unchanged(model, before)


def test_adalora_tensor_missing_is_refused(tmp_path):
    folder = copy_case("adalora", tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    del tensors["base_model.model.4.lora_E"]
    save_file(tensors, folder / "adapter_model.safetensors")
    model = fixture_model("adalora")
    before = state(model)
    with pytest.raises(AdapterFileError, match="module '4' lacks one of lora_A, lora_E, lora_B"):
        lorazoo.load(model, folder)
    assert_unchanged(model, before)


@pytest.mark.parametrize("case", ["adalora", "adalora_unmasked"])
def test_adalora_convert_both_ways_keeps_tensors_and_ranks(tmp_path, case):
    from lorazoo.peft_format import convert

    file = convert(DATA / case, tmp_path / "a.safetensors", "lorazoo")
    back = convert(file, tmp_path / "back", "peft")
    theirs = load_file(DATA / case / "adapter_model.safetensors")
    ours = load_file(back / "adapter_model.safetensors")
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    cfg = json.loads((back / "adapter_config.json").read_text())
    orig = json.loads((DATA / case / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA"
    for key in ("init_r", "target_r", "lora_alpha", "tinit", "tfinal", "deltaT", "total_step"):
        assert cfg[key] == orig[key], key
    # The pattern written keeps each layer's rank (PEFT cuts its fresh layer to it).
    sums = lambda p: {k: sum(v) for k, v in (p or {}).items() if sum(v) < len(v)}  # noqa: E731
    assert sums(cfg["rank_pattern"]) == sums(orig["rank_pattern"])


def test_conv1d_fixture_loads_onto_gpt2_conv1d_layers_and_saves_back(tmp_path):
    model = fixture_model("lora_conv1d")
    lorazoo.load(model, DATA / "lora_conv1d")
    hosts = {p: h for p, h, _ in adapters_named(model, "default")}
    assert len(hosts) == 2 and all(type(h).__name__ == "AdaptedConv1D" for h in hosts.values())
    lorazoo.save(model, tmp_path / "out", format="peft")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    theirs = load_file(DATA / "lora_conv1d" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)


# --------------------------------------------------------------------------------------------
# Against the installed PEFT
# --------------------------------------------------------------------------------------------


def tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=50,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        tie_word_embeddings=False,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(3))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def compare_layers(model: nn.Module, peft_model: nn.Module) -> None:
    """Each adapted layer alone, within the tolerance model's τ."""
    g = torch.Generator().manual_seed(7)
    inner = peft_model.base_model.model
    for p, host, a in adapters_named(model, "default"):
        assert layer_kind(host) == "linear"
        x = torch.randn(5, host.in_features, generator=g)
        with torch.no_grad():
            got, want = host(x), inner.get_submodule(p)(x)
        tau = merge_tolerance(x, host.weight.detach(), host.bias, [a.lowrank(host.weight.detach())])
        err = (got.double() - want.double()).abs()
        worst = f"{p}: max error {err.max().item():.3g} over τ {tau.max().item():.3g}"
        assert bool((err <= tau).all()), worst


def train_peft(pm: nn.Module, x: torch.Tensor, steps: int, adalora_total: int | None = None) -> None:
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=3e-2)
    for step in range(steps):
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        if adalora_total is not None:
            pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.eval()


GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


@pytest.mark.parametrize(
    "flags", [{}, {"use_rslora": True}, {"use_dora": True}], ids=["lora", "rslora", "dora"]
)
def test_peft_conv1d_adapter_loads_with_equal_outputs(tmp_path, flags):
    peft = pytest.importorskip("peft")
    base, x = tiny_gpt2(), ids(50)
    pm = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=GPT2_TARGETS, fan_in_fan_out=True, **flags),
    )
    train_peft(pm, x, steps=3)
    pm.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"]
    model = lorazoo.load(copy.deepcopy(base), tmp_path / "adapter")
    assert len(adapters_named(model, "default")) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj × 2 layers
    compare_layers(model, pm)
    torch.testing.assert_close(logits(model, x), logits(pm, x), rtol=1e-5, atol=1e-5)
    with lorazoo.disabled(model):
        assert (logits(model, x) - logits(pm, x)).abs().max() > 1e-4  # the adapter was trained


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora", "olora"])
def test_lorazoo_conv1d_export_loads_into_peft(tmp_path, variant):
    peft = pytest.importorskip("peft")
    base, x = tiny_gpt2(), ids(50)
    model = lorazoo.inject(copy.deepcopy(base), variant, targets=GPT2_TARGETS, r=4, alpha=8)
    opt = torch.optim.Adam(lorazoo.param_groups(model, lr=3e-2))
    for _ in range(3):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    lorazoo.save(model, tmp_path / "adapter", format="peft")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    if variant != "olora":  # OLoRA's rank-2r form is checked on the whole model
        compare_layers(model, pm)
    torch.testing.assert_close(logits(model, x), logits(pm, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("final_mask", [True, False], ids=["rank_pattern", "no_rank_pattern"])
def test_peft_adalora_loads_with_equal_outputs(tmp_path, final_mask):
    peft = pytest.importorskip("peft")
    base, x = tiny_llama(), ids(48)
    total = 4
    config = peft.AdaLoraConfig(
        init_r=6, target_r=3, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], total_step=total
    )
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    train_peft(pm, x, steps=total + 1 if final_mask else 3, adalora_total=total if final_mask else None)
    pm.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["rank_pattern"] is not None) == final_mask
    model = lorazoo.load(copy.deepcopy(base), tmp_path / "adapter")
    assert lorazoo.adapter_names(model) == {"default": "adalora"}
    if final_mask:
        want = {k[: -len(".lora_E")]: sum(v) for k, v in saved["rank_pattern"].items()}
        assert ranks(model) == want
    compare_layers(model, pm)
    torch.testing.assert_close(logits(model, x), logits(pm, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("final_mask", [True, False], ids=["cut", "uncut"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lorazoo_adalora_export_loads_into_peft(tmp_path, final_mask, arch):
    peft = pytest.importorskip("peft")
    if arch == "llama":
        base, x, targets = tiny_llama(), ids(48), ["q_proj", "v_proj", "down_proj"]
    else:
        base, x, targets = tiny_gpt2(), ids(50), ["c_attn", "c_fc"]
    total = 5
    model = lorazoo.inject(
        copy.deepcopy(base), "adalora", targets=targets, r=6, target_r=3, alpha=8, total_steps=total
    )
    opt = torch.optim.Adam(lorazoo.param_groups(model, lr=2e-2))
    lorazoo.attach(model, opt)
    for _ in range(total if final_mask else 2):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    cut = {p: r for p, r in ranks(model).items() if r < 6}
    assert bool(cut) == final_mask
    lorazoo.save(model, tmp_path / "adapter", format="peft")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["init_r"] == 6 and cfg["target_r"] == 3
    assert cfg["fan_in_fan_out"] == (arch == "gpt2")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    compare_layers(model, pm)
    torch.testing.assert_close(logits(model, x), logits(pm, x), rtol=1e-5, atol=1e-5)
    # And back: PEFT's own save of what it loaded reads into lorazoo with the same ranks.
    pm.save_pretrained(tmp_path / "again")
    back = lorazoo.load(copy.deepcopy(base), tmp_path / "again")
    assert ranks(back) == ranks(model)
    torch.testing.assert_close(logits(back, x), logits(model, x), rtol=1e-5, atol=1e-5)


def test_vera_on_conv1d_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    base, x = tiny_gpt2(), ids(50)
    pm = peft.get_peft_model(
        copy.deepcopy(base), peft.VeraConfig(r=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    )
    train_peft(pm, x, steps=2)
    pm.save_pretrained(tmp_path / "peft")
    model = lorazoo.load(copy.deepcopy(base), tmp_path / "peft")
    assert lorazoo.adapter_names(model) == {"default": "vera"}
    compare_layers(model, pm)
    torch.testing.assert_close(logits(model, x), logits(pm, x), rtol=1e-5, atol=1e-5)
    lorazoo.save(model, tmp_path / "back", format="peft")
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back").eval()
    torch.testing.assert_close(logits(again, x), logits(model, x), rtol=1e-5, atol=1e-5)


def test_adalora_modules_to_save_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    base, x = tiny_gpt2(), ids(50)
    config = peft.AdaLoraConfig(
        init_r=4,
        target_r=2,
        lora_alpha=8,
        target_modules=["c_attn"],
        total_step=5,
        modules_to_save=["lm_head"],
    )
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    train_peft(pm, x, steps=2)
    pm.save_pretrained(tmp_path / "peft")
    model = lorazoo.load(copy.deepcopy(base), tmp_path / "peft")
    assert lorazoo.trained_modules(model) == {"lm_head": ["default"]}
    torch.testing.assert_close(logits(model, x), logits(pm, x), rtol=1e-5, atol=1e-5)
    lorazoo.save(model, tmp_path / "back", format="peft")
    written = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert written["modules_to_save"] == ["lm_head"]
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back").eval()
    torch.testing.assert_close(logits(again, x), logits(model, x), rtol=1e-5, atol=1e-5)


def test_inspect_shows_adalora_per_layer_ranks(capsys):
    from lorazoo.cli import main

    assert main(["inspect", str(DATA / "adalora")]) == 0
    out = capsys.readouterr().out
    cfg = json.loads((DATA / "adalora" / "adapter_config.json").read_text())
    assert "variant:  adalora" in out and "orth_reg_form='peft'" in out
    for key, kept in cfg["rank_pattern"].items():
        path = key[: -len(".lora_E")]
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(path + " "))
        assert f"r={sum(kept)} " in line and f"lora_E {sum(kept)}×1" in line
