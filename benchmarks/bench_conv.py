"""LoRA on a Conv2d stack: lorazoo vs PEFT, side by side in one run.

The model is ``--layers`` Conv2d layers of 64 → 64 channels, 3×3, padding 1 (ReLU between),
on a batch of 8 images of 32×32; LoRA r=16 (α=32) on every conv layer, with the same
(perturbed, so non-zero) factors in both libraries. Rounds are interleaved (lorazoo, PEFT,
PEFT, lorazoo, …) on one thread and each ratio is formed per round:

* unmerged forward (eval, no grad);
* train step: forward, backward of a squared-output loss, AdamW step on the adapter tensors;
* merge: lorazoo's merge then unmerge must give the base weights back bit for bit (checked,
  and PEFT's own unmerge error printed beside it); the merge time is shown for information.

    python benchmarks/bench_conv.py [--quick] [--threads 1] [--repeats N] [--layers L]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _common import fmt, markdown_table, peft_module, record, set_threads, stats, verdict
from torch import nn

import lorazoo

R, ALPHA, CH, SIZE, BATCH = 16, 32, 64, 32, 8


def stack(layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Conv2d(CH, CH, 3, padding=1))
        if i < layers - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, few rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    args = ap.parse_args()
    set_threads(args.threads)
    peft = peft_module()
    if peft is None:
        print("PEFT is not installed: nothing to compare against")
        return
    layers = args.layers or (2 if args.quick else 4)
    repeats = args.repeats or (5 if args.quick else 15)
    torch.manual_seed(0)
    base = stack(layers).eval()
    targets = [str(2 * i) for i in range(layers)]
    lz = copy.deepcopy(base)
    lorazoo.inject(lz, "lora", targets=targets, r=R, alpha=ALPHA)
    pm = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets)
    )
    with torch.no_grad():  # the same non-zero factors in both
        for t in targets:
            a = lz.get_submodule(t).adapters["default"]
            a.lora_B.normal_(std=0.02)
            pl = pm.base_model.model.get_submodule(t)
            pl.lora_A["default"].weight.copy_(a.lora_A.view_as(pl.lora_A["default"].weight))
            pl.lora_B["default"].weight.copy_(a.lora_B.view_as(pl.lora_B["default"].weight))
    x = torch.randn(BATCH, CH, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ya, yb = lz(x), pm(x)
    assert torch.allclose(ya, yb, rtol=1e-4, atol=1e-4), float((ya - yb).abs().max())

    opts = {
        "lorazoo": torch.optim.AdamW([p for p in lz.parameters() if p.requires_grad], lr=1e-4),
        "PEFT": torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4),
    }
    models = {"lorazoo": lz, "PEFT": pm}

    def forward(name: str) -> None:
        with torch.no_grad():
            models[name](x)

    def train(name: str) -> None:
        m, opt = models[name], opts[name]
        m.train()
        loss = m(x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        m.eval()

    out = {f"{case}:{lib}": {"wall": [], "cpu": []} for case in ("fwd", "train") for lib in models}
    for fn, case in ((forward, "fwd"), (train, "train")):
        for lib in models:  # warm-up
            fn(lib)
        for i in range(repeats):
            order = list(models) if i % 2 == 0 else list(reversed(models))
            for lib in order:
                w, c = time.perf_counter(), time.process_time()
                fn(lib)
                out[f"{case}:{lib}"]["wall"].append(time.perf_counter() - w)
                out[f"{case}:{lib}"]["cpu"].append(time.process_time() - c)

    rows = []
    for case, label in (("fwd", "unmerged forward"), ("train", "train step")):
        for clock in ("cpu", "wall"):
            a, b = out[f"{case}:lorazoo"][clock], out[f"{case}:PEFT"][clock]
            rel = stats([p / q for p, q in zip(a, b, strict=True)])
            rows.append(
                [
                    label,
                    clock,
                    fmt(stats(a), unit=" ms", scale=1e3),
                    fmt(stats(b), unit=" ms", scale=1e3),
                    fmt(rel),
                    verdict(rel, 0.8),
                ]
            )

    # merge: exact for lorazoo (checked bit for bit), PEFT's unmerge error for comparison
    before = {k: v.clone() for k, v in lorazoo.base_state_dict(lz).items()}
    w = time.perf_counter()
    lorazoo.merge(lz)
    t_merge = time.perf_counter() - w
    with torch.no_grad():
        yl_m = lz(x)
    lorazoo.unmerge(lz)
    exact = all(
        torch.equal(v.view(torch.int32), before[k].view(torch.int32))
        for k, v in lorazoo.base_state_dict(lz).items()
    )
    peft_before = {k: v.clone() for k, v in pm.base_model.model.state_dict().items() if "base_layer" in k}
    w = time.perf_counter()
    pm.merge_adapter()
    t_peft = time.perf_counter() - w
    with torch.no_grad():
        yp_m = pm(x)
    pm.unmerge_adapter()
    peft_err = max(
        float((v - peft_before[k]).abs().max())
        for k, v in pm.base_model.model.state_dict().items()
        if k in peft_before
    )
    rows.append(
        [
            "merge → unmerge",
            "wall",
            f"{t_merge * 1e3:.3g} ms, unmerge bit-exact: {'yes' if exact else 'NO'}",
            f"{t_peft * 1e3:.3g} ms, unmerge max |Δw| {peft_err:.2g}",
            "—",
            "met" if exact else "missed",
        ]
    )
    assert torch.allclose(yl_m, yp_m, rtol=1e-4, atol=1e-4)
    record(
        f"LoRA r={R} on a Conv2d stack ({layers}× 64→64, 3×3, batch {BATCH} of 32×32), lorazoo vs PEFT",
        markdown_table(
            ["case", "clock", "lorazoo", "PEFT", "lorazoo ÷ PEFT", "target ≤ 0.8 (merge: bit-exact)"],
            rows,
        ),
        f"Median [interquartile range] over {repeats} interleaved rounds, 1 thread; ratio per round. "
        "Both compute the adapter as convolutions (A with the layer's 3×3 kernel, B as 1×1); the base "
        "convolution is about 80% of the work at r=16, so the forward and train-step ratios cannot "
        "fall far below 1 without changing the method.",
    )


if __name__ == "__main__":
    main()
