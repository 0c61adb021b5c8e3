"""Loading a PEFT adapter folder: ``lorazoo.load(model, folder)`` vs PEFT's own
``PeftModel.from_pretrained(model, folder)``.

The folder is written by PEFT (``save_pretrained``) for LoRA r=16 on every linear layer but the
head of the small Llama (``lorazoo.bench.model.LLAMA_SMALL``), or DoRA with ``--variant dora``,
with trained-looking (perturbed) factors. Each round loads it with both libraries onto fresh
copies of the base (the copy is not timed), alternating which goes first, and checks that the
two loaded models give the same output within a loose tolerance (the tests check exactness).

    python benchmarks/bench_peft_load.py [--quick] [--threads 1] [--repeats N] [--variant lora|dora]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from _common import LLAMA_TARGETS, fmt, markdown_table, peft_module, record, set_threads, stats, verdict

import lorazoo
from lorazoo.bench.model import LLAMA_SMALL, LlamaConfig, LlamaLike

R = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, few rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--variant", choices=("lora", "dora"), default="lora")
    args = ap.parse_args()
    set_threads(args.threads)
    peft = peft_module()
    if peft is None:
        print("PEFT is not installed: nothing to compare against")
        return
    cfg = LLAMA_SMALL if not args.quick else LlamaConfig(**{**LLAMA_SMALL.to_dict(), "num_layers": 2})
    repeats = args.repeats or (3 if args.quick else 15)
    torch.manual_seed(0)
    template = LlamaLike(cfg).eval()
    pm = peft.get_peft_model(
        copy.deepcopy(template),
        peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=LLAMA_TARGETS, use_dora=args.variant == "dora"),
    )
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    folder = Path(tempfile.mkdtemp(prefix="lorazoo-bench-peft-load-")) / "adapter"
    pm.save_pretrained(str(folder))
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    out = {k: {"wall": [], "cpu": []} for k in ("lorazoo", "PEFT")}
    for i in range(repeats + 1):
        a, b = copy.deepcopy(template), copy.deepcopy(template)
        loaded = {}
        jobs = [
            ("lorazoo", lambda a=a: lorazoo.load(a, folder)),
            ("PEFT", lambda b=b: peft.PeftModel.from_pretrained(b, str(folder))),
        ]
        if i % 2:
            jobs.reverse()
        for name, fn in jobs:
            w, c = time.perf_counter(), time.process_time()
            loaded[name] = fn()
            if i:
                out[name]["wall"].append(time.perf_counter() - w)
                out[name]["cpu"].append(time.process_time() - c)
        if i == 0:
            with torch.no_grad():
                ya, yb = loaded["lorazoo"](x), loaded["PEFT"](x)
            assert torch.allclose(ya, yb, rtol=1e-4, atol=1e-4), (ya - yb).abs().max()
        del a, b, loaded
    rows = []
    for clock in ("cpu", "wall"):
        lz, pf = stats(out["lorazoo"][clock]), stats(out["PEFT"][clock])
        rel = stats([p / q for p, q in zip(out["lorazoo"][clock], out["PEFT"][clock], strict=True)])
        rows.append([clock, fmt(lz, unit=" s"), fmt(pf, unit=" s"), fmt(rel), verdict(rel, 0.5)])
    record(
        f"PEFT folder load onto a fresh base ({args.variant} r={R}, small Llama {cfg.num_layers}L)",
        markdown_table(
            ["clock", "lorazoo.load(folder)", "PeftModel.from_pretrained", "lorazoo ÷ PEFT", "target ≤ 0.5"],
            rows,
        ),
        "Median [interquartile range] over rounds on fresh copies of the base; ratio per round.",
    )


if __name__ == "__main__":
    main()
