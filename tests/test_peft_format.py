"""PEFT adapter folders, both ways.

Three groups: the checked-in fixtures made by PEFT (``tests/data/peft``, read without PEFT);
adapters made by the installed PEFT on a tiny Llama and a plain MLP, loaded by lorazoo; and
lorazoo's exports loaded by PEFT. Outputs are compared per adapted layer against the tolerance
model (``lorazoo.testing.merge_tolerance``: the two libraries compute the same real number in
different orders) and for the whole model. Refusals leave the model exactly as it was.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import lorazoo
from lorazoo import AdapterFileError, LorazooError
from lorazoo.engine.inject import adapters_named
from lorazoo.engine.layer import layer_kind
from lorazoo.testing import merge_tolerance

DATA = Path(__file__).parent / "data" / "peft"
CASES = sorted(p.name for p in DATA.iterdir() if (p / "adapter_config.json").is_file())


def _fixtures_module():
    spec = importlib.util.spec_from_file_location("make_fixtures", DATA / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FIX = _fixtures_module()


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def layer_bound(host: nn.Module, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """The tolerance model's τ for one adapted layer on input ``x`` (ids for an embedding)."""
    adapter = host.adapters[name]
    if layer_kind(host) == "embedding":
        weight = host.weight.detach().t()
        x = F.one_hot(x, host.num_embeddings).to(weight.dtype)
    elif layer_kind(host) == "conv":  # the linear map on each input patch
        weight = host.weight_view().detach()
        x = host.kind.dense_input(host, x)
    else:
        weight = host.weight.detach()
    return merge_tolerance(x, weight, host.bias, [adapter.lowrank(weight)])


def assert_layer_close(host: nn.Module, x: torch.Tensor, want: torch.Tensor) -> None:
    with torch.no_grad():
        got = host(x)
    tau = layer_bound(host, x)
    assert got.shape == want.shape
    if layer_kind(host) == "conv":  # output rows matching the input patches τ is for
        got, want = host.kind.dense_output(host, got), host.kind.dense_output(host, want)
    err = (got.double() - want.double()).abs()
    assert bool((err <= tau).all()), f"max error {err.max().item():.3g} over τ {tau.max().item():.3g}"


def snapshot(model: nn.Module) -> tuple[list[type], dict[str, torch.Tensor], dict[str, bool]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    return [type(m) for m in model.modules()], state, grads


def assert_unchanged(model: nn.Module, snap) -> None:
    types, state, grads = snap
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    assert lorazoo.adapter_names(model) == {}


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


# --------------------------------------------------------------------------------------------
# Checked-in fixtures (no PEFT needed)
# --------------------------------------------------------------------------------------------


def test_fixtures_present_and_small():
    assert set(CASES) == set(FIX.BUILDERS)
    for case in CASES:
        assert sum(f.stat().st_size for f in (DATA / case).iterdir()) < 16_000, case


@pytest.mark.parametrize("case", CASES)
def test_fixture_loads_with_peft_outputs(case):
    model = fixture_model(case)
    expected = load_file(DATA / case / "expected.safetensors")
    lorazoo.load(model, DATA / case)
    layers = sorted(k[len("layer.") : -len(".input")] for k in expected if k.endswith(".input") and "." in k)
    assert layers, "the fixture records at least one adapted layer"
    assert {p for p, _, _ in adapters_named(model, "default")} == set(layers)
    for path in layers:
        assert_layer_close(
            model.get_submodule(path), expected[f"layer.{path}.input"], expected[f"layer.{path}.output"]
        )
    with torch.no_grad():
        out = model(expected["input"])
    torch.testing.assert_close(out, expected["output"], rtol=1e-5, atol=1e-6)
    # Without the adapter the outputs differ: the fixture's adapter is trained, not at its init.
    with torch.no_grad(), lorazoo.disabled(model):
        assert (model(expected["input"]) - expected["output"]).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("case", "variant", "config"),
    [
        ("lora", "lora", {"r": 2, "alpha": 4.0}),
        ("rslora", "rslora", {"r": 4, "alpha": 3.0}),
        ("dora", "dora", {"r": 2, "alpha": 4.0, "rslora": False}),
        ("vera", "vera", {"r": 6, "projection_prng_key": 3, "save_projection": True}),
        ("vera_regenerated", "vera", {"r": 6, "projection_prng_key": 4, "save_projection": False}),
        ("lora_alpha_pattern", "lora", {"r": 2, "alpha": 6.0}),
        ("lora_embedding", "lora", {"r": 3, "alpha": 6.0}),
        ("lora_modules_to_save", "lora", {"r": 2, "alpha": 4.0}),
        ("lora_conv1d", "lora", {"r": 2, "alpha": 4.0}),
        ("adalora", "adalora", {"r": 4, "alpha": 6.0, "target_r": 2, "total_steps": 3}),
        ("adalora_unmasked", "adalora", {"r": 3, "alpha": 5.0, "target_r": 2, "orth_reg_form": "peft"}),
        ("lora_conv", "lora", {"r": 2, "alpha": 4.0}),
        ("dora_conv1d", "dora", {"r": 2, "alpha": 3.0, "rslora": False}),
    ],
)
def test_fixture_maps_onto_variant_and_config(case, variant, config):
    model = fixture_model(case)
    lorazoo.load(model, DATA / case)
    assert lorazoo.adapter_names(model) == {"default": variant}
    got = adapters_named(model, "default")[0][2].config.to_dict()
    assert {k: got[k] for k in config} == config


def test_weights_file_path_reads_the_folder():
    model = fixture_model("lora")
    lorazoo.load(model, DATA / "lora" / "adapter_model.safetensors")
    twin = fixture_model("lora")
    lorazoo.load(twin, DATA / "lora")
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))


def test_lorazoo_round_trip_of_a_peft_fixture(tmp_path):
    """PEFT folder → lorazoo file → fresh model, and → PEFT folder → fresh model: same bits."""
    model = fixture_model("dora")
    lorazoo.load(model, DATA / "dora")
    x = torch.randn(4, 8)
    with torch.no_grad():
        y = model(x)
    for path, fmt in ((tmp_path / "a.safetensors", "lorazoo"), (tmp_path / "folder", "peft")):
        lorazoo.save(model, path, format=fmt)
        fresh = fixture_model("dora")
        lorazoo.load(fresh, path)
        with torch.no_grad():
            assert torch.equal(fresh(x), y), fmt


# --------------------------------------------------------------------------------------------
# Refusals: named, and the model unchanged
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"modules_to_save": [4]}, "modules_to_save must be a list of module names"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"peft_type": "IA3"}, "peft_type='IA3'"),
        ({"peft_type": None}, "peft_type=None"),
        ({"init_lora_weights": "olora"}, "init_lora_weights='olora' rewrites the base"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"use_dora": True}, "lacks lora_magnitude_vector"),
        ({"alpha_pattern": {"2": 5}}, "module '2' has lora_alpha=5"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
        ({"lora_bias": True}, "lora_bias"),
        ({"modules_to_save": {"score": 1}}, "modules_to_save must be a list of module names"),
        ({"lora_alpha": "big"}, "wrong type or form"),
        ({"lora_dropout": None}, "wrong type or form"),
        ({"alpha_pattern": ["2"]}, "wrong type or form"),
        ({"alpha_pattern": {"(": 3}}, "wrong type or form"),
        ({"lora_alpha": 0}, "alpha must be a finite number > 0"),
        ({"lora_dropout": 1.5}, "dropout"),
    ],
)
def test_refused_configs_leave_model_unchanged(tmp_path, changes, match):
    folder = copy_case("lora", tmp_path, **changes)
    model = fixture_model("lora")
    snap = snapshot(model)
    with pytest.raises(AdapterFileError, match=match):
        lorazoo.load(model, folder)
    assert_unchanged(model, snap)


def test_fan_in_fan_out_on_linear_layers_reads_as_peft_computes(tmp_path):
    # PEFT resets the flag to false on nn.Linear (it only means "weight stored in × out", which
    # is transformers' Conv1D), and its factors are in the linear layout either way: outputs are
    # the fixture's own.
    folder = copy_case("lora", tmp_path, fan_in_fan_out=True)
    model = fixture_model("lora")
    lorazoo.load(model, folder)
    expected = load_file(DATA / "lora" / "expected.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input"]), expected["output"], rtol=1e-5, atol=1e-6)


def test_rank_pattern_with_different_ranks_is_refused_by_module(tmp_path):
    folder = copy_case("lora", tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.4.lora_A.weight"] = torch.randn(3, 12)
    tensors["base_model.model.4.lora_B.weight"] = torch.randn(4, 3)
    save_file(tensors, folder / "adapter_model.safetensors")
    model = fixture_model("lora")
    snap = snapshot(model)
    with pytest.raises(AdapterFileError, match="module '4' has r=3"):
        lorazoo.load(model, folder)
    assert_unchanged(model, snap)


def test_pickle_files_are_refused_unopened(tmp_path, monkeypatch):
    import pickle

    def no_unpickling(*a, **k):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    folder = copy_case("lora", tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    model = fixture_model("lora")
    snap = snapshot(model)
    with pytest.raises(AdapterFileError, match=r"pickle \(adapter_model.bin\).*never unpickles"):
        lorazoo.load(model, folder)
    with pytest.raises(AdapterFileError, match="is a pickle file; lorazoo never unpickles"):
        lorazoo.load(model, folder / "adapter_model.bin")
    assert_unchanged(model, snap)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_bad_json_is_refused(tmp_path, text):
    folder = copy_case("lora", tmp_path)
    (folder / "adapter_config.json").write_text(text)
    model = fixture_model("lora")
    snap = snapshot(model)
    with pytest.raises(AdapterFileError, match="adapter_config.json"):
        lorazoo.load(model, folder)
    assert_unchanged(model, snap)


def test_folder_without_config_or_weights(tmp_path):
    model = fixture_model("lora")
    snap = snapshot(model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFileError, match="without adapter_config.json"):
        lorazoo.load(model, tmp_path / "empty")
    folder = copy_case("lora", tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFileError, match="no adapter_model.safetensors"):
        lorazoo.load(model, folder)
    folder2 = copy_case("dora", tmp_path)
    (folder2 / "adapter_model.safetensors").write_bytes(b"truncated")
    with pytest.raises(AdapterFileError, match="not a readable safetensors"):
        lorazoo.load(model, folder2)
    assert_unchanged(model, snap)


def test_unknown_tensor_and_wrong_model_are_refused(tmp_path):
    folder = copy_case("lora", tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.0.lora_C.weight"] = torch.zeros(2)
    save_file(tensors, folder / "adapter_model.safetensors")
    model = fixture_model("lora")
    snap = snapshot(model)
    with pytest.raises(AdapterFileError, match="'0.lora_C.weight' is not one lorazoo maps"):
        lorazoo.load(model, folder)
    assert_unchanged(model, snap)
    other = FIX.EmbedNet()  # has no modules '0', '2', '4'
    snap = snapshot(other)
    with pytest.raises(AdapterFileError, match="modules this model does not have"):
        lorazoo.load(other, DATA / "lora")
    assert_unchanged(other, snap)


def test_a_later_tensor_failing_leaves_model_unchanged(tmp_path):
    """The last module's factor has the wrong width: nothing of the earlier ones is applied."""
    folder = copy_case("lora", tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.4.lora_A.weight"] = torch.randn(2, 13)
    save_file(tensors, folder / "adapter_model.safetensors")
    model = fixture_model("lora")
    snap = snapshot(model)
    with pytest.raises(AdapterFileError, match="'4'"):
        lorazoo.load(model, folder)
    assert_unchanged(model, snap)


def test_save_format_unknown_is_refused(tmp_path):
    model = fixture_model("lora")
    lorazoo.load(model, DATA / "lora")
    with pytest.raises(LorazooError, match="format='lorazoo' or format='peft'"):
        lorazoo.save(model, tmp_path / "x", format="onnx")
    assert not (tmp_path / "x").exists()


def test_save_peft_into_existing_folder_replaces_both_files(tmp_path):
    model = fixture_model("lora")
    lorazoo.load(model, DATA / "lora")
    folder = copy_case("dora", tmp_path)
    lorazoo.save(model, folder, format="peft")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["use_dora"] is False and cfg["peft_type"] == "LORA"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_olora_stacked_rewrites_are_refused(tmp_path):
    torch.manual_seed(0)
    model = FIX.mlp()
    lorazoo.inject(model, "olora", targets=["0"], name="a", r=2)
    lorazoo.inject(model, "olora", targets=["0"], name="b", r=2)
    with pytest.raises(LorazooError, match="base rewrites by \\['a'\\]"):
        lorazoo.save(model, tmp_path / "b", name="b", format="peft")
    assert not (tmp_path / "b").exists()
    lorazoo.save(model, tmp_path / "a", name="a", format="peft")  # 'a' was made on the original base
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 4


# --------------------------------------------------------------------------------------------
# Against the installed PEFT
# --------------------------------------------------------------------------------------------


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


def llama_input() -> torch.Tensor:
    return torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(3))


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _train(model: nn.Module, params, x: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.Adam(params, lr=3e-2)
    for _ in range(steps):
        loss = _run(model, x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _layer_inputs(model: nn.Module, paths) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    out = {}
    for p in paths:
        m = model.get_submodule(p)
        if layer_kind(m) == "embedding":
            out[p] = torch.randint(0, m.num_embeddings, (13,), generator=g)
        else:
            out[p] = torch.randn(5, m.in_features, generator=g)
    return out


def _compare(model: nn.Module, peft_model: nn.Module, x: torch.Tensor) -> None:
    paths = [p for p, _, _ in adapters_named(model, "default")]
    inner = peft_model.base_model.model
    for p, xi in _layer_inputs(model, paths).items():
        with torch.no_grad():
            want = inner.get_submodule(p)(xi)
        assert_layer_close(model.get_submodule(p), xi, want)
    with torch.no_grad():
        torch.testing.assert_close(_run(model, x), _run(peft_model, x), rtol=1e-5, atol=1e-5)


def _peft_configs():
    peft = pytest.importorskip("peft")
    attn = ["q_proj", "v_proj", "down_proj"]
    return {
        "lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=attn),
        "rslora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=attn, use_rslora=True),
        "dora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=attn, use_dora=True),
        "vera": peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]),
        "embedding": peft.LoraConfig(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"]),
    }


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora", "vera", "embedding"])
@pytest.mark.parametrize("arch", ["llama", "mlp"])
def test_peft_made_adapter_loads_with_equal_outputs(tmp_path, kind, arch):
    peft = pytest.importorskip("peft")
    if arch == "llama":
        base, x = tiny_llama(), llama_input()
        config = _peft_configs()[kind]
    else:
        if kind == "embedding":
            base, x = FIX.EmbedNet().eval(), torch.randint(0, FIX.VOCAB, (3, 5))
            config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["embed", "head"])
        else:
            torch.manual_seed(0)
            base, x = FIX.mlp().eval(), torch.randn(6, 8)
            config = {
                "lora": peft.LoraConfig(r=2, lora_alpha=3, target_modules=["0", "2", "4"]),
                "rslora": peft.LoraConfig(r=3, lora_alpha=2, target_modules=["0", "4"], use_rslora=True),
                "dora": peft.LoraConfig(r=2, lora_alpha=3, target_modules=["0", "2"], use_dora=True),
                "vera": peft.VeraConfig(r=5, target_modules=["0", "2", "4"], save_projection=False),
            }[kind]
    original = copy.deepcopy(base)
    pm = peft.get_peft_model(base, config)
    _train(pm, [p for p in pm.parameters() if p.requires_grad], x)
    pm.eval()
    pm.save_pretrained(tmp_path / "adapter")
    model = copy.deepcopy(original)
    lorazoo.load(model, tmp_path / "adapter")
    _compare(model, pm, x)
    with torch.no_grad(), lorazoo.disabled(model):
        assert (_run(model, x) - _run(pm, x)).abs().max() > 1e-4  # the adapter was trained


@pytest.mark.parametrize(
    "variant", ["lora", "rslora", "dora", "dora_rs", "vera", "loraplus", "olora", "olora_rs", "embedding"]
)
@pytest.mark.parametrize("arch", ["llama", "mlp"])
def test_lorazoo_export_loads_into_peft(tmp_path, variant, arch):
    peft = pytest.importorskip("peft")
    if arch == "llama":
        base, x = tiny_llama(), llama_input()
        targets = ["q_proj", "v_proj", "down_proj"] if variant != "embedding" else ["embed_tokens", "q_proj"]
    elif variant == "embedding":
        base, x, targets = FIX.EmbedNet().eval(), torch.randint(0, FIX.VOCAB, (3, 5)), ["embed", "head"]
    else:
        torch.manual_seed(0)
        base, x, targets = FIX.mlp().eval(), torch.randn(6, 8), ["0", "2", "4"]
    original = copy.deepcopy(base)
    name = {"embedding": "lora", "dora_rs": "dora", "olora_rs": "olora"}.get(variant, variant)
    hyper = {"r": 8} if variant == "vera" else {"r": 2, "alpha": 3}
    if variant.endswith("_rs"):
        hyper["rslora"] = True
    model = lorazoo.inject(base, name, targets=targets, **hyper)
    _train(model, lorazoo.param_groups(model, lr=3e-2), x)
    model.eval()
    lorazoo.save(model, tmp_path / "adapter", format="peft")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "adapter").eval()
    _compare(model, pm, x)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    if variant.startswith("olora"):
        assert cfg["r"] == 4  # the rank-2r plain LoRA on the original base
    assert cfg.get("use_rslora", False) == (variant in ("rslora", "dora_rs", "olora_rs"))
    # And back: PEFT's own save of what it loaded reads into lorazoo with the same outputs.
    pm.save_pretrained(tmp_path / "again")
    back = lorazoo.load(copy.deepcopy(original), tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(_run(back, x), _run(model, x), rtol=1e-5, atol=1e-5)


def test_stored_base_embedding_must_equal_the_models(tmp_path):
    """PEFT may store the base table beside an embedding adapter (``save_embedding_layers``, as
    it does for a transformers model); an equal one is accepted, a different one refused."""
    folder = copy_case("lora_embedding", tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    model = fixture_model("lora_embedding")
    tensors["base_model.model.embed.base_layer.weight"] = model.embed.weight.detach().clone()
    save_file(tensors, folder / "adapter_model.safetensors")
    lorazoo.load(fixture_model("lora_embedding"), folder)  # the same base: fine
    with torch.no_grad():
        model.embed.weight[3, 1] += 0.5  # another base checkpoint
    snap = snapshot(model)
    with pytest.raises(AdapterFileError, match="stores its own base weight for 'embed'"):
        lorazoo.load(model, folder)
    assert_unchanged(model, snap)


@given(
    variant=st.sampled_from(["lora", "rslora", "dora", "loraplus"]),
    r=st.integers(1, 4),
    alpha=st.floats(0.25, 64.0, allow_nan=False),
    dims=st.lists(st.integers(4, 9), min_size=2, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_peft_folder_round_trip_is_identity(tmp_path_factory, variant, r, alpha, dims, dtype, seed):
    """save(format="peft") then load gives the same adapter: same variant (LoRA+ → LoRA), config,
    every tensor bit for bit, and so the same outputs."""
    torch.manual_seed(seed)
    layers = [nn.Linear(a, b) for a, b in zip(dims, dims[1:], strict=False)]
    model = nn.Sequential(*layers).to(dtype)
    fresh = copy.deepcopy(model)
    lorazoo.inject(model, variant, targets=[nn.Linear], r=r, alpha=alpha)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    folder = tmp_path_factory.mktemp("rt") / "adapter"
    lorazoo.save(model, folder, format="peft")
    lorazoo.load(fresh, folder)
    want = "lora" if variant == "loraplus" else variant
    assert lorazoo.adapter_names(fresh) == {"default": want}
    a_cfg = adapters_named(model, "default")[0][2].config
    b_cfg = adapters_named(fresh, "default")[0][2].config
    assert (b_cfg.r, b_cfg.alpha, b_cfg.dropout) == (a_cfg.r, a_cfg.alpha, a_cfg.dropout)
    mine = {p: a for p, _, a in adapters_named(model, "default")}
    for path, _, adapter in adapters_named(fresh, "default"):
        for key, t in adapter.state_dict().items():
            ref = mine[path].state_dict()[key]
            assert t.dtype == ref.dtype and torch.equal(t, ref), (path, key)
    x = torch.randn(3, dims[0], dtype=dtype)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("case", ["dora", "vera"])
@pytest.mark.parametrize("at", [1, 2, 3])
def test_interrupted_load_leaves_model_unchanged(monkeypatch, case, at):
    """A KeyboardInterrupt while the converted adapter is committed into the model (at each of
    the engine's checkpoints) leaves the model as it was; a second try then works."""
    import lorazoo.engine._interrupt as interrupt

    calls = []

    def interrupting():
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt

    monkeypatch.setattr(interrupt, "checkpoint", interrupting)
    model = fixture_model(case)
    snap = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        lorazoo.load(model, DATA / case)
    assert len(calls) == at
    assert_unchanged(model, snap)
    monkeypatch.setattr(interrupt, "checkpoint", lambda: None)
    lorazoo.load(model, DATA / case)  # and a second try works
    assert lorazoo.adapter_names(model) == {"default": case}


class _HalfScale(lorazoo.LowRankAdapter):
    """A third-party variant PEFT has no form for: LoRA with the scale α/(2r)."""

    name = "halfscale_peft_test"

    @property
    def scale(self) -> float:
        return self.config.alpha / (2 * self.config.r)


class _HalfScalePlugin:
    @lorazoo.hookimpl
    def lorazoo_variants(self):
        return [_HalfScale]


def test_variant_without_peft_form_is_refused_by_name(tmp_path):
    plugin = _HalfScalePlugin()
    lorazoo.register(plugin)
    try:
        model = fixture_model("lora")
        lorazoo.inject(model, "halfscale_peft_test", targets=["0"], r=2)
        with pytest.raises(LorazooError, match="'halfscale_peft_test' adapter, which has no PEFT form"):
            lorazoo.save(model, tmp_path / "out", format="peft")
        assert not (tmp_path / "out").exists()
        file = lorazoo.save(model, tmp_path / "h.safetensors")
        with pytest.raises(LorazooError, match="variant 'halfscale_peft_test' has no PEFT form"):
            lorazoo.peft_format.convert(file, tmp_path / "out", "peft")
        assert not (tmp_path / "out").exists()
    finally:
        lorazoo.unregister(plugin)
