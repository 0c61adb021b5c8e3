"""Adapter load onto a fresh base: ``lorazoo.load`` vs PEFT loading the same adapter.

LoRA r=16 on every linear layer of the small Llama (512/1376/8 layers, 56 layers). The same
tensors are written once as a lorazoo file and once as a PEFT adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``). PEFT's load is what
``PeftModel.from_pretrained`` does for a plain module: read the config, inject, read the file and
``set_peft_model_state_dict``. Each round loads both onto fresh copies of the base (the copy is
not timed), alternating which goes first; every load is checked to give the saved tensors.

    python benchmarks/bench_load.py [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from _common import (
    NOT_INSTALLED,
    fmt,
    markdown_table,
    peft_lora_config,
    peft_module,
    record,
    set_threads,
    stats,
    verdict,
)

import lorazoo
from lorazoo.bench.model import LLAMA_SMALL, LlamaConfig, LlamaLike

R = 16


def _peft_load(base, folder: Path):
    peft = peft_module()
    from safetensors.torch import load_file

    cfg = peft.LoraConfig.from_pretrained(str(folder))
    peft.inject_adapter_in_model(cfg, base)
    sd = load_file(str(folder / "adapter_model.safetensors"))
    peft.set_peft_model_state_dict(base, sd)
    return base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, few rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    set_threads(args.threads)
    cfg = LLAMA_SMALL if not args.quick else LlamaConfig(**{**LLAMA_SMALL.to_dict(), "num_layers": 2})
    repeats = args.repeats or (3 if args.quick else 15)
    peft = peft_module()
    torch.manual_seed(0)
    template = LlamaLike(cfg)
    src = copy.deepcopy(template)
    lorazoo.inject(src, "lora", targets="all-linear", r=R, alpha=2 * R)
    with torch.no_grad():
        for _, _, a in lorazoo.engine.iter_adapters(src):
            a.lora_B.normal_(std=0.01)
    tmp = Path(tempfile.mkdtemp(prefix="lorazoo-bench-load-"))
    ours_file = lorazoo.save(src, tmp / "adapter.safetensors")
    expect = {p: (a.lora_A.detach(), a.lora_B.detach()) for p, _, a in lorazoo.engine.iter_adapters(src)}
    folder = tmp / "peft"
    if peft is not None:
        from safetensors.torch import save_file

        pm = copy.deepcopy(template)
        pcfg = peft_lora_config(R, 2 * R)
        peft.inject_adapter_in_model(pcfg, pm)
        with torch.no_grad():
            for path, (A, B) in expect.items():
                layer = pm.get_submodule(path)
                layer.lora_A["default"].weight.copy_(A)
                layer.lora_B["default"].weight.copy_(B)
        folder.mkdir()
        pcfg.save_pretrained(str(folder))
        save_file(peft.get_peft_model_state_dict(pm), str(folder / "adapter_model.safetensors"))
    out = {k: {"wall": [], "cpu": []} for k in ("lorazoo", "PEFT")}
    for i in range(repeats + 1):
        a, b = copy.deepcopy(template), copy.deepcopy(template)
        jobs = [("lorazoo", lambda a=a: lorazoo.load(a, ours_file))]
        if peft is not None:
            jobs.append(("PEFT", lambda b=b: _peft_load(b, folder)))
        if i % 2:
            jobs.reverse()
        for name, fn in jobs:
            w, c = time.perf_counter(), time.process_time()
            fn()
            if i:
                out[name]["wall"].append(time.perf_counter() - w)
                out[name]["cpu"].append(time.process_time() - c)
        for path, (A, B) in expect.items():
            got = a.get_submodule(path).adapters["default"]
            assert torch.equal(got.lora_A, A) and torch.equal(got.lora_B, B), path
            if peft is not None:
                layer = b.get_submodule(path)
                assert torch.equal(layer.lora_A["default"].weight, A), path
        del a, b
    rows = []
    for clock in ("cpu", "wall"):
        lz = stats(out["lorazoo"][clock])
        row = [clock, fmt(lz, unit=" s")]
        if peft is not None:
            pf = stats(out["PEFT"][clock])
            rel = stats([x / y for x, y in zip(out["lorazoo"][clock], out["PEFT"][clock], strict=True)])
            row += [fmt(pf, unit=" s"), fmt(rel), verdict(rel, 0.5)]
        else:
            row += [NOT_INSTALLED, "", ""]
        rows.append(row)
    size = ours_file.stat().st_size / 2**20
    record(
        f"Adapter load onto a fresh base (LoRA r={R}, small Llama {cfg.num_layers}L, {size:.1f} MiB file)",
        markdown_table(["clock", "lorazoo.load", "PEFT load", "lorazoo ÷ PEFT", "target ≤ 0.5"], rows),
        "Median [interquartile range] over rounds on fresh copies of the base; ratio per round.",
    )


if __name__ == "__main__":
    main()
