"""Inject time: LoRA r=16 on every linear layer of a 7B-shaped Llama stack, lorazoo vs PEFT.

Two bases: the 7B shape (4096/11008/32 layers, 224 adapted layers) built on the ``meta``
device, so no memory is touched and the figure is the per-module work alone; and the small Llama
(512/1376/8 layers, 56 layers) with real tensors, where initialising ``A`` costs too. Each round
builds fresh models (untimed) and then times lorazoo's ``inject`` and PEFT's
``inject_adapter_in_model`` one after the other, alternating which goes first.

    python benchmarks/bench_inject.py [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import time

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
from lorazoo.bench.model import LLAMA_7B, LLAMA_SMALL, LlamaConfig, LlamaLike

R = 16


def _time(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def rounds(make, repeats: int) -> dict[str, dict[str, list[float]]]:
    peft = peft_module()
    out = {k: {"wall": [], "cpu": []} for k in ("lorazoo", "PEFT")}
    n_layers = 0
    for i in range(repeats + 1):
        a, b = make(), make()
        jobs = [("lorazoo", lambda a=a: lorazoo.inject(a, "lora", targets="all-linear", r=R, alpha=2 * R))]
        if peft is not None:
            jobs.append(("PEFT", lambda b=b: peft.inject_adapter_in_model(peft_lora_config(R, 2 * R), b)))
        if i % 2:
            jobs.reverse()
        for name, fn in jobs:
            w, c = _time(fn)
            if i:  # the first round warms caches and imports
                out[name]["wall"].append(w)
                out[name]["cpu"].append(c)
        n_layers = len(lorazoo.engine.hosts(a))
        del a, b
    out["layers"] = n_layers  # type: ignore[assignment]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8-layer 7B-wide stack, 2-layer small model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    set_threads(args.threads)
    peft = peft_module()
    big = LLAMA_7B if not args.quick else LlamaConfig(**{**LLAMA_7B.to_dict(), "num_layers": 8})
    small = LLAMA_SMALL if not args.quick else LlamaConfig(**{**LLAMA_SMALL.to_dict(), "num_layers": 2})
    repeats = args.repeats or (3 if args.quick else 9)
    template = LlamaLike(small)
    cases = [
        (f"7B shape on meta ({big.num_layers} layers)", lambda: LlamaLike(big, device="meta")),
        (f"small Llama, real fp32 ({small.num_layers} layers)", lambda: copy.deepcopy(template)),
    ]
    rows = []
    for label, make in cases:
        s = rounds(make, repeats)
        n = s.pop("layers")
        for clock in ("cpu", "wall"):
            lz = stats(s["lorazoo"][clock])
            row = [label, n, clock, fmt(lz, unit=" s"), f"{n / lz.median:,.0f}"]
            if peft is not None:
                pf = stats(s["PEFT"][clock])
                speed = stats([p / q for p, q in zip(s["PEFT"][clock], s["lorazoo"][clock], strict=True)])
                row += [fmt(pf, unit=" s"), f"{n / pf.median:,.0f}", fmt(speed)]
                ok = verdict(lz, 0.3) + " / " + verdict(speed, 3.0, below=False)
            else:
                row += [NOT_INSTALLED, "", ""]
                ok = verdict(lz, 0.3) + " / PEFT " + NOT_INSTALLED
            row.append(ok)
            rows.append(row)
    table = markdown_table(
        [
            "base",
            "layers",
            "clock",
            "lorazoo",
            "lorazoo modules/s",
            "PEFT",
            "PEFT modules/s",
            "PEFT ÷ lorazoo",
            "target ≤ 0.3 s / ≥ 3×",
        ],
        rows,
    )
    record(
        f"Inject time, LoRA r={R} all-linear (lorazoo.inject vs peft.inject_adapter_in_model)",
        table,
        "Median [interquartile range] over rounds with fresh models; 'PEFT ÷ lorazoo' is per round.",
    )


if __name__ == "__main__":
    main()
