"""Adapter files: round trip, validation, atomic writes, errors that leave the model unchanged."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from test_engine import Net, assert_same, state

import lorazoo
import lorazoo.testing


def _trained(variant="lora", r=4, dtype=torch.float32, name="default"):
    model = Net(dtype)
    lorazoo.inject(model, variant, targets=["q_proj", "v_proj"], r=r, alpha=8, name=name)
    lorazoo.testing.perturb(model, 3)
    model.eval()
    return model


def test_file_holds_only_adapter_tensors_and_metadata(tmp_path):
    model = _trained()
    path = lorazoo.save(model, tmp_path / "a.safetensors")
    doc, tensors = lorazoo.io.read(path)
    assert sorted(tensors) == [
        "block.q_proj.lora_A",
        "block.q_proj.lora_B",
        "block.v_proj.lora_A",
        "block.v_proj.lora_B",
    ]
    assert doc["variant"] == "lora" and doc["config"] == {"r": 4, "alpha": 8, "dropout": 0.0}
    assert doc["modules"]["block.q_proj"]["d_out"] == 24 and doc["dtype"] == "torch.float32"
    assert os.path.getsize(path) < 4 * sum(t.numel() for t in tensors.values()) + 2048
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary left behind


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roundtrip_into_fresh_and_existing_adapter(tmp_path, dtype):
    model = _trained(dtype=dtype)
    x = torch.randn(3, 16, dtype=dtype)
    y = model(x)
    lorazoo.save(model, tmp_path / "a.safetensors")
    fresh = Net(dtype).eval()
    lorazoo.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(fresh(x), y)
    # loading into an existing adapter of the same variant overwrites its tensors
    other = Net(dtype)
    lorazoo.inject(other, "lora", targets=["q_proj", "v_proj"], r=4, alpha=8)
    other.eval()
    lorazoo.load(other, tmp_path / "a.safetensors")
    assert torch.equal(other(x), y)


def test_load_for_other_shapes_leaves_model_unchanged(tmp_path):
    lorazoo.save(_trained(r=4), tmp_path / "r4.safetensors")
    model = Net()
    lorazoo.inject(model, "lora", targets=["q_proj", "v_proj"], r=2, alpha=8)
    before = state(model)
    with pytest.raises(lorazoo.AdapterFileError, match=r"shape \(4, 16\) in the file but \(2, 16\)"):
        lorazoo.load(model, tmp_path / "r4.safetensors")
    assert_same(before, model)

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.block.q_proj = torch.nn.Linear(16, 32)

    wide = Wider()
    before = state(wide)
    with pytest.raises(lorazoo.AdapterFileError, match="shape 24×16"):
        lorazoo.load(wide, tmp_path / "r4.safetensors")
    assert_same(before, wide)


def test_load_of_another_variant_into_existing_adapter_is_refused(tmp_path):
    lorazoo.save(_trained("rslora"), tmp_path / "rs.safetensors")
    model = _trained("lora")
    before = state(model)
    with pytest.raises(lorazoo.AdapterFileError, match="holds a 'rslora' adapter.*is 'lora'"):
        lorazoo.load(model, tmp_path / "rs.safetensors")
    assert_same(before, model)
    lorazoo.load(model, tmp_path / "rs.safetensors", name="second")  # fine under another name
    assert lorazoo.adapter_names(model) == {"default": "lora", "second": "rslora"}


def test_load_onto_model_missing_modules(tmp_path):
    lorazoo.save(_trained(), tmp_path / "a.safetensors")
    model = torch.nn.Sequential(torch.nn.Linear(16, 24))
    before = state(model)
    with pytest.raises(lorazoo.AdapterFileError, match="does not have"):
        lorazoo.load(model, tmp_path / "a.safetensors")
    assert_same(before, model)


@pytest.mark.parametrize("cut", [10, 100, -1, -37])
def test_truncated_file(tmp_path, cut):
    path = lorazoo.save(_trained(), tmp_path / "a.safetensors")
    blob = path.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(blob[:cut])
    model = Net()
    before = state(model)
    with pytest.raises(lorazoo.AdapterFileError, match="corrupt or truncated"):
        lorazoo.load(model, tmp_path / "t.safetensors")
    assert_same(before, model)


def test_files_that_are_not_adapters(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    model = Net()
    before = state(model)
    with pytest.raises(lorazoo.AdapterFileError, match="corrupt or truncated"):
        lorazoo.load(model, tmp_path / "junk.safetensors")
    with pytest.raises(lorazoo.AdapterFileError, match="not a lorazoo adapter"):
        lorazoo.load(model, tmp_path / "plain.safetensors")
    with pytest.raises(lorazoo.AdapterFileError, match="cannot read"):
        lorazoo.load(model, tmp_path / "missing.safetensors")
    assert_same(before, model)


def test_newer_format_version_and_unknown_variant(tmp_path):
    path = lorazoo.save(_trained(), tmp_path / "a.safetensors")
    doc, tensors = lorazoo.io.read(path)
    meta = {
        "lorazoo.format": "lorazoo-adapter",
        "lorazoo.format_version": "99",
        "lorazoo.adapter": json.dumps(doc),
    }
    save_file(tensors, tmp_path / "v99.safetensors", metadata=meta)
    with pytest.raises(lorazoo.AdapterFileError, match="version 99"):
        lorazoo.load(Net(), tmp_path / "v99.safetensors")
    doc["variant"] = "nonesuch"
    meta = {
        "lorazoo.format": "lorazoo-adapter",
        "lorazoo.format_version": "1",
        "lorazoo.adapter": json.dumps(doc),
    }
    save_file(tensors, tmp_path / "x.safetensors", metadata=meta)
    with pytest.raises(lorazoo.UnknownVariantError, match="nonesuch"):
        lorazoo.load(Net(), tmp_path / "x.safetensors")


def test_interrupted_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    lorazoo.save(_trained(r=2), path)
    original = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        lorazoo.save(_trained(r=4), path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_save_unknown_adapter_name(tmp_path):
    with pytest.raises(lorazoo.LorazooError, match="no adapter named 'other'"):
        lorazoo.save(_trained(), tmp_path / "a.safetensors", name="other")
