"""``lorazoo inspect``, ``lorazoo convert`` and ``lorazoo --version``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorazoo
from lorazoo.cli import main

DATA = Path(__file__).parent / "data" / "peft"


def _fixtures_module():
    spec = importlib.util.spec_from_file_location("make_fixtures", DATA / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FIX = _fixtures_module()


def base(case: str) -> torch.nn.Module:
    model = FIX.BUILDERS[case]()
    model.load_state_dict(load_file(DATA / case / "base.safetensors"))
    return model.eval()


def outputs(model: torch.nn.Module, case: str) -> torch.Tensor:
    x = load_file(DATA / case / "expected.safetensors")["input"]
    with torch.no_grad():
        return model(x)


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lorazoo {lorazoo.__version__}"


def test_inspect_peft_folder(capsys):
    assert main(["inspect", str(DATA / "dora")]) == 0
    out = capsys.readouterr().out
    assert "PEFT adapter folder (peft_type LORA, written by peft 0.21.2)" in out
    assert "variant:  dora" in out
    assert "r=2, alpha=4.0" in out
    assert "modules:  2 (2 linear)" in out
    assert "0  linear    12×8 (out×in)  r=2  lora_A 2×8, lora_B 12×2, lora_magnitude_vector 12" in out
    assert "6 tensors, 112 numbers, 448 bytes of data" in out


def test_inspect_vera_folder_shows_projections(capsys):
    assert main(["inspect", str(DATA / "vera")]) == 0
    out = capsys.readouterr().out
    assert "variant:  vera" in out and "projection_prng_key=3" in out
    assert "shared:   vera_A 6×12" in out and "shared:   vera_B 12×6" in out
    assert "4  linear    4×? (out×in)  r=6  vera_lambda_b 4, vera_lambda_d 6" in out


def test_inspect_lorazoo_file(tmp_path, capsys):
    model = base("lora_embedding")
    lorazoo.inject(model, "rslora", targets=["embed"], r=3, alpha=2)
    path = lorazoo.save(model, tmp_path / "a.safetensors")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "lorazoo adapter file (written by lorazoo" in out
    assert "variant:  rslora (adapter name 'default')" in out
    assert "embed  embedding 6×20 (out×in)  r=3  lora_A 3×20, lora_B 6×3" in out
    assert f"{path.stat().st_size:,} bytes on disk" in out


@pytest.mark.parametrize("case", ["lora", "rslora", "dora", "lora_embedding", "lora_alpha_pattern"])
def test_convert_peft_to_lorazoo_and_back(tmp_path, case, capsys):
    direct = lorazoo.load(base(case), DATA / case)
    want = outputs(direct, case)
    file = tmp_path / "a.safetensors"
    assert main(["convert", str(DATA / case), str(file), "--to", "lorazoo"]) == 0
    assert f"wrote {file}" in capsys.readouterr().out
    assert torch.equal(outputs(lorazoo.load(base(case), file), case), want)
    folder = tmp_path / "again"
    assert main(["convert", str(file), str(folder), "--to", "peft"]) == 0
    assert torch.equal(outputs(lorazoo.load(base(case), folder), case), want)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_convert_lorazoo_vera_to_peft_regenerates_projections(tmp_path):
    """A lorazoo VeRA file keeps only the seed; the PEFT folder gets the projections."""
    model = base("vera")
    lorazoo.inject(model, "vera", targets=["0", "2", "4"], r=6, projection_prng_key=9)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    want = outputs(model, "vera")
    file = lorazoo.save(model, tmp_path / "v.safetensors")
    assert not any(k.startswith("__shared__") for k in load_file(file))
    assert main(["convert", str(file), str(tmp_path / "peft"), "--to", "peft"]) == 0
    stored = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert stored["base_model.vera_A"].shape == (6, 12) and stored["base_model.vera_B"].shape == (12, 6)
    assert torch.equal(outputs(lorazoo.load(base("vera"), tmp_path / "peft"), "vera"), want)
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(base("vera"), tmp_path / "peft").eval()
    torch.testing.assert_close(outputs(pm, "vera"), want, rtol=1e-6, atol=1e-6)


def test_convert_refusals_write_nothing(tmp_path, capsys):
    model = base("lora")
    lorazoo.inject(model, "olora", targets=["0"], r=2)
    olora = lorazoo.save(model, tmp_path / "o.safetensors")
    assert main(["convert", str(olora), str(tmp_path / "out"), "--to", "peft"]) == 1
    assert "OLoRA adapter" in capsys.readouterr().err
    assert main(["convert", str(DATA / "vera"), str(tmp_path / "out"), "--to", "lorazoo"]) == 1
    assert "does not record each layer's input size" in capsys.readouterr().err
    assert main(["convert", str(DATA / "lora"), str(tmp_path / "out"), "--to", "peft"]) == 1
    assert "already a PEFT folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(DATA / "lora"), str(olora), "--to", "lorazoo"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(DATA / "lora"), str(tmp_path / "x"), "--to", "onnx"]) == 2
    assert not (tmp_path / "x").exists()


def test_inspect_refuses_pickles_and_junk(tmp_path, capsys):
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04junk")
    assert main(["inspect", str(tmp_path / "adapter_model.bin")]) == 1
    assert "never unpickles" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{")
    assert main(["inspect", str(tmp_path / "bad")]) == 1
    assert "not readable JSON" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 1
    assert "cannot read adapter file" in capsys.readouterr().err


def test_converted_config_names_exact_modules(tmp_path):
    """The written target_modules select exactly the adapted paths (PEFT matches a string by
    re.fullmatch), so a module whose name ends like a target is not picked up by accident."""
    file = tmp_path / "a.safetensors"
    assert main(["convert", str(DATA / "lora"), str(file), "--to", "lorazoo"]) == 0
    assert main(["convert", str(file), str(tmp_path / "p"), "--to", "peft"]) == 0
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == "^(0|2|4)$"
