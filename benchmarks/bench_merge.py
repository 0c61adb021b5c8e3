"""Merge and unmerge of one 4096×11008 layer (LoRA r=16) against the memory-bound limit.

The limit is one read and one write of the weight, measured in the same run as a plain
``dst.copy_(W)``. Every merge must read and write the weight once, so ``merge / copy`` cannot go
below 1; lorazoo's figure includes all of its exact-unmerge bookkeeping (the int8 record and the
sparse / wide forms). PEFT (``LoraLayer.merge`` / ``unmerge``) is timed on an identical copy.
After the timed rounds, the weights are compared with the originals: lorazoo must be bit for bit
identical; PEFT's plain subtraction drifts, reported as max |Δ| and the share of elements changed.

``W ~ N(0, 0.02²)`` (the Llama initialisation) and ``B`` is drawn so that ``|s·B·A|`` is about
``--rel`` of ``|W|`` (default 10 %, a trained adapter).

    python benchmarks/bench_merge.py [--quick] [--rel 0.1] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _common import (
    NOT_INSTALLED,
    fmt,
    markdown_table,
    paired,
    peft_lora_config,
    peft_module,
    record,
    set_threads,
    stats,
    verdict,
)
from torch import nn

import lorazoo

D_IN, D_OUT, R = 4096, 11008, 16


def _layer(dtype: torch.dtype, d_in: int, d_out: int) -> nn.Sequential:
    torch.manual_seed(0)
    lin = nn.Linear(d_in, d_out, bias=False, dtype=dtype)
    with torch.no_grad():
        lin.weight.normal_(std=0.02)
    return nn.Sequential(lin)


def _set_b(A: torch.Tensor, B: torch.Tensor, scale: float, rel: float) -> None:
    """Draw ``B`` so that the update's entries have about ``rel`` times the weight's 0.02 std."""
    row = A.float().pow(2).sum(1).mean().sqrt()
    with torch.no_grad():
        B.normal_(std=rel * 0.02 / (scale * float(row)))


def _split(copy_fn, merge_fn, unmerge_fn, repeats: int) -> tuple:
    """``merge / copy`` and ``unmerge / copy`` per round (process time); the copy runs before
    the merge in even rounds and after the unmerge in odd ones."""
    m, u = [], []
    merge_fn()
    unmerge_fn()
    for i in range(repeats):
        if i % 2 == 0:
            c0 = time.process_time()
            copy_fn()
            c = time.process_time() - c0
        t0 = time.process_time()
        merge_fn()
        t1 = time.process_time()
        unmerge_fn()
        t2 = time.process_time()
        if i % 2:
            c0 = time.process_time()
            copy_fn()
            c = time.process_time() - c0
        m.append((t1 - t0) / c)
        u.append((t2 - t1) / c)
    return stats(m), stats(u)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 1024×2752 layer, few rounds")
    ap.add_argument("--rel", type=float, default=0.1, help="|ΔW| / |W| (default 0.1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    set_threads(args.threads)
    d_in, d_out = (1024, 2752) if args.quick else (D_IN, D_OUT)
    repeats = args.repeats or (3 if args.quick else 11)
    peft = peft_module()
    rows, drift_rows, notes = [], [], []
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        ours = _layer(dtype, d_in, d_out)
        original = ours[0].weight.detach().clone()
        theirs = copy.deepcopy(ours)
        lorazoo.inject(ours, "lora", targets=nn.Linear, r=R, alpha=2 * R)
        a = ours[0].adapters["default"]
        _set_b(a.lora_A, a.lora_B, a.scale, args.rel)
        w = ours[0].weight.data
        dst = torch.empty_like(w)
        cases = {
            "copy": lambda dst=dst, w=w: dst.copy_(w),
            "lorazoo merge+unmerge": lambda m=ours: lorazoo.unmerge(lorazoo.merge(m)),
        }
        peft_layer = None
        if peft is not None:
            peft.inject_adapter_in_model(peft_lora_config(R, 2 * R, ["0"]), theirs)
            peft_layer = theirs[0]
            with torch.no_grad():
                peft_layer.lora_A["default"].weight.copy_(a.lora_A)
                peft_layer.lora_B["default"].weight.copy_(a.lora_B)

            def pf_both(layer=peft_layer):
                layer.merge()
                layer.unmerge()

            cases["PEFT merge+unmerge"] = pf_both
        samples = paired(cases, repeats=repeats, warmup=1)
        # merge and unmerge alone: each pair is (copy, merge, unmerge), the copy first or last
        lm, lu = _split(
            cases["copy"], lambda m=ours: lorazoo.merge(m), lambda m=ours: lorazoo.unmerge(m), repeats
        )
        if peft_layer is not None:
            pm, pu = _split(cases["copy"], peft_layer.merge, peft_layer.unmerge, repeats)
        copy_ms = stats(samples["copy"]["cpu"])
        for clock in ("cpu", "wall"):
            both = stats(
                [
                    x / c / 2
                    for x, c in zip(
                        samples["lorazoo merge+unmerge"][clock], samples["copy"][clock], strict=True
                    )
                ]
            )
            pboth = (
                stats(
                    [
                        x / c / 2
                        for x, c in zip(
                            samples["PEFT merge+unmerge"][clock], samples["copy"][clock], strict=True
                        )
                    ]
                )
                if peft_layer is not None
                else None
            )
            rows.append(
                [
                    name,
                    clock,
                    fmt(stats(samples["copy"][clock]), unit=" ms", scale=1e3),
                    fmt(both),
                    fmt(pboth) if pboth else NOT_INSTALLED,
                    verdict(both, 4.0),
                ]
            )
        notes.append(
            f"{name}: merge alone {fmt(lm)}× copy, unmerge alone {fmt(lu)}× copy (lorazoo, process time)"
            + (f"; PEFT merge {fmt(pm)}×, unmerge {fmt(pu)}×" if peft_layer is not None else "")
            + f"; copy of the weight {copy_ms.median * 1e3:.1f} ms"
        )
        rep = lorazoo.merge_report(lorazoo.merge(ours))
        form = "sparse" if ours[0].merged.residual.dense is None else "dense"
        lorazoo.unmerge(ours)
        notes.append(
            f"{name}: bytes held while merged {rep.bytes_per_element:.3f} per element ({form} "
            f"record), {rep.wide_elements} wide elements"
        )
        # drift after every round: paired (1 warm-up + repeats), split (1 + repeats), the report
        exact = torch.equal(ours[0].weight.detach().view(torch.uint8), original.view(torch.uint8))
        rounds = 2 * repeats + 3
        if peft_layer is not None:
            base = theirs[0].get_base_layer().weight.detach()
            delta = (base.float() - original.float()).abs()
            changed = (base != original).float().mean().item()
            pdrift = f"max {delta.max().item():.2e}, {100 * changed:.2f} % of elements changed"
            rounds_p = 2 * repeats + 2
        else:
            pdrift, rounds_p = NOT_INSTALLED, 0
        drift_rows.append(
            [
                name,
                f"{'bit-identical' if exact else 'CHANGED'} after {rounds} rounds",
                f"{pdrift} after {rounds_p} rounds",
            ]
        )
    header = [
        "dtype",
        "clock",
        "copy (1 read + 1 write)",
        "lorazoo (merge+unmerge)/2 ÷ copy",
        "PEFT ÷ copy",
        "target ≤ 4×",
    ]
    table = markdown_table(header, rows)
    table += "\n\n" + markdown_table(["dtype", "lorazoo base weight", "PEFT base weight"], drift_rows)
    record(
        f"Merge + unmerge vs one read+write of the weight ({d_out}×{d_in}, LoRA r={R}, "
        f"|ΔW|/|W|≈{args.rel:g})",
        table,
        "Each figure is per direction: (merge + unmerge) / 2 divided by the copy time of the same pair, "
        "median [interquartile range] over interleaved pairs; 'inconclusive' means the range straddles "
        "the target.\n\n" + "\n".join(f"* {n}" for n in notes),
    )


if __name__ == "__main__":
    main()
