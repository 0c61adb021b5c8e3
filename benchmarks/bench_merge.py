"""Merge and unmerge of LoRA r=16 against PEFT's, in one run, each direction and dtype on its own.

Two cases, each in fp32 and bf16:

* **model**: every linear layer of a four-layer Llama (hidden 1024, intermediate 2752, built
  from ``transformers.LlamaConfig``, random weights, nothing downloaded): ``lorazoo.merge`` /
  ``lorazoo.unmerge`` against PEFT's ``merge_adapter`` / ``unmerge_adapter`` on an identical
  copy with the same factors. Targets: merge ≤ 2× PEFT, unmerge ≤ 1× PEFT.
* **layer**: one 4096×11008 layer (``LoraLayer.merge`` / ``unmerge`` for PEFT), with a plain
  copy of the weight (one read and one write, the memory-bound limit) for scale. Target: merge
  ≤ 1.5× PEFT; unmerge reported.

lorazoo's times include all of its bookkeeping (the exact-unmerge record, the merged factors,
the checksum, the rollback state); PEFT's subtraction is not exact, so after the timed rounds
the weights are compared with the originals: lorazoo's must be bit for bit identical, PEFT's
drift is reported. Each ratio is formed per round (one lorazoo and one PEFT call, in alternating
order, process time) and summarised as median [interquartile range]; ``met`` / ``missed`` when the
whole range is on one side of the target, else ``inconclusive``.

``W`` is the model's initialisation (N(0, 0.02²) for Llama); ``B`` is drawn so that ``|s·B·A|``
is about ``--rel`` of ``|W|`` (default 10 %, a trained adapter).

    python benchmarks/bench_merge.py [--quick] [--rel 0.1] [--threads 1] [--repeats N]

One intra-op thread and few rounds by default, to spare a shared machine.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _common import (
    LLAMA_TARGETS,
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
from torch import nn

import lorazoo

D_IN, D_OUT, R = 4096, 11008, 16
TARGETS = {("model", "merge"): 2.0, ("model", "unmerge"): 1.0, ("layer", "merge"): 1.5}


def _set_b(A: torch.Tensor, B: torch.Tensor, scale: float, rel: float, std: float = 0.02) -> None:
    """Draw ``B`` so that the update's entries have about ``rel`` times the weight's ``std``."""
    row = A.float().pow(2).sum(1).mean().sqrt()
    with torch.no_grad():
        B.normal_(std=rel * std / (scale * float(row)))


def _llama(dtype: torch.dtype, quick: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers = (256, 688, 2) if quick else (1024, 2752, 4)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        vocab_size=1024,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _layer(dtype: torch.dtype, d_in: int, d_out: int) -> nn.Module:
    torch.manual_seed(0)
    lin = nn.Linear(d_in, d_out, bias=False, dtype=dtype)
    with torch.no_grad():
        lin.weight.normal_(std=0.02)
    return nn.Sequential(lin).eval()


def _pair(model: nn.Module, targets: list[str], rel: float, peft):
    """``(ours, theirs)``: lorazoo and PEFT LoRA adapters with the same factors on two copies."""
    theirs = copy.deepcopy(model) if peft is not None else None
    lorazoo.inject(model, "lora", targets=targets, r=R, alpha=2 * R)
    for _, host in lorazoo.engine.hosts(model):
        a = host.adapters["default"]
        _set_b(a.lora_A, a.lora_B, a.scale, rel)
    if theirs is None:
        return model, None
    theirs = peft.get_peft_model(theirs, peft_lora_config(R, 2 * R, targets))
    ours = dict(lorazoo.engine.hosts(model))
    with torch.no_grad():
        for name, mod in theirs.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                path = name.removeprefix("base_model.model.")
                a = ours[path].adapters["default"]
                mod.lora_A["default"].weight.copy_(a.lora_A)
                mod.lora_B["default"].weight.copy_(a.lora_B)
    return model, theirs


def _rounds(calls: dict[str, object], repeats: int) -> dict[str, list[float]]:
    """Process time per call; each round runs lorazoo's merge+unmerge and PEFT's, alternating
    which goes first. One untimed warm-up round."""
    names = list(calls)
    out: dict[str, list[float]] = {k: [] for k in names}
    groups = [names[:2], names[2:]] if len(names) == 4 else [names]
    for i in range(repeats + 1):
        order = groups if i % 2 == 0 else list(reversed(groups))
        for group in order:
            for name in group:
                t0 = time.process_time()
                calls[name]()
                dt = time.process_time() - t0
                if i:
                    out[name].append(dt)
    return out


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.detach().contiguous().view(torch.uint8), b.detach().contiguous().view(torch.uint8))


def _drift(now: torch.Tensor, before: torch.Tensor) -> str:
    delta = (now.float() - before.float()).abs()
    changed = (now != before).float().mean().item()
    return f"max |Δ| {delta.max().item():.2e}, {100 * changed:.1f} % changed"


def _case(case: str, dtype: torch.dtype, args, peft, rows: list, drift_rows: list, notes: list) -> None:
    name = str(dtype).replace("torch.", "")
    if case == "model":
        model, targets = _llama(dtype, args.quick), LLAMA_TARGETS
    else:
        d_in, d_out = (1024, 2752) if args.quick else (D_IN, D_OUT)
        model, targets = _layer(dtype, d_in, d_out), ["0"]
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ours, theirs = _pair(model, targets, args.rel, peft)
    calls = {"lorazoo merge": lambda: lorazoo.merge(ours), "lorazoo unmerge": lambda: lorazoo.unmerge(ours)}
    if theirs is not None:
        if case == "model":
            calls["PEFT merge"] = theirs.merge_adapter
            calls["PEFT unmerge"] = theirs.unmerge_adapter
        else:
            layer = theirs.base_model.model[0]
            calls["PEFT merge"] = layer.merge
            calls["PEFT unmerge"] = layer.unmerge
    repeats = args.repeats or (3 if case == "layer" else 5)
    t = _rounds(calls, repeats)
    for direction in ("merge", "unmerge"):
        ours_t = stats(t[f"lorazoo {direction}"])
        target = TARGETS.get((case, direction))
        if theirs is not None:
            r = stats([a / b for a, b in zip(t[f"lorazoo {direction}"], t[f"PEFT {direction}"], strict=True)])
            peft_t = fmt(stats(t[f"PEFT {direction}"]), unit=" s")
            ratio, judged = fmt(r), (verdict(r, target) if target else "(reported)")
        else:
            peft_t = ratio = NOT_INSTALLED
            judged = "(no PEFT)"
        rows.append(
            [
                case,
                name,
                direction,
                fmt(ours_t, unit=" s"),
                peft_t,
                ratio,
                f"≤ {target}×" if target else "–",
                judged,
            ]
        )
    if case == "layer":
        w = ours[0].weight.data
        dst = torch.empty_like(w)
        c = []
        for _ in range(repeats):
            t0 = time.process_time()
            dst.copy_(w)
            c.append(time.process_time() - t0)
        m = stats(t["lorazoo merge"]).median
        u = stats(t["lorazoo unmerge"]).median
        cm = stats(c).median
        notes.append(
            f"layer {name}: one copy of the weight {cm * 1e3:.1f} ms; lorazoo merge {m / cm:.2g}× and "
            f"unmerge {u / cm:.2g}× that copy"
        )
    rep = lorazoo.merge_report(lorazoo.merge(ours))
    lorazoo.unmerge(ours)
    notes.append(
        f"{case} {name}: bytes held while merged {rep.bytes_per_element:.3f} per element, "
        f"{rep.wide_elements} elements kept whole"
    )
    exact = all(_bitwise(ours.state_dict()[k], v) for k, v in original.items())
    rounds = 2 * (repeats + 1) + 1
    if theirs is not None:
        sd = {
            k.removeprefix("base_model.model.").replace(".base_layer", ""): v
            for k, v in theirs.state_dict().items()
        }
        worst = max(
            (original[k] - sd[k]).abs().max().item()
            for k in original
            if k in sd and original[k].is_floating_point()
        )
        changed = [k for k in original if k in sd and not torch.equal(sd[k], original[k])]
        some = changed[0] if changed else None
        pdrift = f"max |Δ| {worst:.2e}; {len(changed)} tensors changed" + (
            f" ({some}: {_drift(sd[some], original[some])})" if some else ""
        )
    else:
        pdrift = NOT_INSTALLED
    drift_rows.append(
        [case, name, f"{'bit for bit identical' if exact else 'CHANGED'} after {rounds} rounds", pdrift]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small model and a 1024×2752 layer")
    ap.add_argument("--rel", type=float, default=0.1, help="|ΔW| / |W| (default 0.1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5 model, 3 layer)")
    ap.add_argument("--case", choices=["model", "layer", "both"], default="both")
    args = ap.parse_args()
    set_threads(args.threads)
    peft = peft_module()
    print(
        f"bench_merge: {torch.get_num_threads()} intra-op thread(s), "
        f"{args.repeats or '5 (model) / 3 (layer)'} timed rounds after one warm-up, process time"
    )
    rows: list = []
    drift_rows: list = []
    notes: list = []
    cases = ["model", "layer"] if args.case == "both" else [args.case]
    for case in cases:
        for dtype in (torch.float32, torch.bfloat16):
            _case(case, dtype, args, peft, rows, drift_rows, notes)
    header = ["case", "dtype", "direction", "lorazoo", "PEFT", "lorazoo ÷ PEFT", "target", "verdict"]
    table = markdown_table(header, rows)
    table += "\n\n" + markdown_table(
        ["case", "dtype", "lorazoo base weights", "PEFT base weights"], drift_rows
    )
    size = "small model, 1024×2752 layer" if args.quick else "4-layer Llama 1024/2752, 4096×11008 layer"
    record(
        f"Merge and unmerge against PEFT, each direction ({size}, LoRA r={R}, |ΔW|/|W|≈{args.rel:g}, "
        f"{torch.get_num_threads()} thread)",
        table,
        "Process time per call, median [interquartile range]; each ratio is formed per round. "
        "lorazoo includes all of its exact-unmerge and rollback bookkeeping.\n\n"
        + "\n".join(f"* {n}" for n in notes),
    )


if __name__ == "__main__":
    main()
