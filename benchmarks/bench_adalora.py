"""AdaLoRA's training step next to LoRA at the same initial rank, and next to PEFT's AdaLoRA.

Small Llama (``lorazoo.bench.model.LLAMA_SMALL``: 512/1376/8 layers, vocabulary 32000; built from
its config, nothing downloaded), batch 8×128, adapters on every attention and MLP projection,
``init_r = 12``, ``target_r = 8``, fp32, one thread. A step is forward, loss plus the
orthogonality penalty, backward, AdamW, and the allocator:

* lorazoo LoRA at ``r = 12`` (the reference);
* lorazoo AdaLoRA attached to the optimizer (``lorazoo.attach``), the penalty from
  ``lorazoo.extra_loss``, masking every step (``delta_t = 1``, the most it can cost) and every
  10 steps;
* PEFT's AdaLoRA (``AdaLoraModel`` on the same model, its penalty added by its forward), with
  ``update_and_allocate(step)`` after every optimizer step, ``deltaT`` 1 and 10.

Both allocators are in their budgeting phase throughout (``total_steps`` far away), so every step
updates the importance statistics. Times: interleaved rounds, ratio per round, median
[interquartile range], on process CPU time. Memory, in a separate process (as
``bench_train.py``): the peak above the starting level during one step, after a first step has
created the optimizer state.

Targets: AdaLoRA ÷ LoRA ≤ 1.25 in step time, ≤ 1.15 in peak memory; AdaLoRA ≤ PEFT's AdaLoRA.

    python benchmarks/bench_adalora.py [--quick] [--threads 1] [--repeats N]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from types import SimpleNamespace

import torch
from _common import NOT_INSTALLED, fmt, markdown_table, paired, peft_module, set_threads, stats, verdict
from _memory import mib, peak_bytes
from torch import nn

import lorazoo
from lorazoo.bench.model import LLAMA_SMALL, LlamaConfig, LlamaLike

INIT_R, TARGET_R, ALPHA = 12, 8, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAR = 10**6  # total_steps: the budgeting phase lasts the whole benchmark


class WithLoss(nn.Module):
    """Returns an object with ``.loss``, so PEFT's AdaLoRA forward adds its penalty."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=self.inner.loss(ids))


def lorazoo_step(model: nn.Module, ids: torch.Tensor, attach: bool) -> Callable[[], None]:
    opt = torch.optim.AdamW(lorazoo.param_groups(model, lr=1e-4))
    if attach:
        lorazoo.attach(model, opt, total_steps=FAR)

    def step() -> None:
        loss = model.loss(ids)
        extra = lorazoo.extra_loss(model)
        (loss if extra is None else loss + extra).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def peft_step(base: nn.Module, ids: torch.Tensor, delta_t: int) -> tuple[nn.Module, Callable[[], None]]:
    peft = peft_module()
    cfg = peft.AdaLoraConfig(
        init_r=INIT_R,
        target_r=TARGET_R,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=TARGETS,
        total_step=FAR,
        deltaT=delta_t,
        orth_reg_weight=0.1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuner = peft.tuners.AdaLoraModel(WithLoss(copy.deepcopy(base)), cfg, "default")
    opt = torch.optim.AdamW([p for p in tuner.parameters() if p.requires_grad], lr=1e-4)
    count = [0]

    def step() -> None:
        tuner(ids).loss.backward()
        opt.step()
        tuner.update_and_allocate(count[0])
        opt.zero_grad(set_to_none=True)
        count[0] += 1

    return tuner, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, vocab 2048, batch 2×64, 3 rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    set_threads(args.threads)
    if args.memory_only:
        peak_bytes(lambda: None)  # pin malloc before any allocation (see _memory.py)
    if args.quick:
        cfg = LlamaConfig(**{**LLAMA_SMALL.to_dict(), "num_layers": 2, "vocab_size": 2048})
        batch, repeats = (2, 65), args.repeats or 3
    else:
        cfg, batch, repeats = LLAMA_SMALL, (8, 129), args.repeats or 5
    torch.manual_seed(0)
    base = LlamaLike(cfg)
    ids = torch.randint(0, cfg.vocab_size, batch)
    steps: dict[str, Callable[[], None]] = {}
    models: dict[str, nn.Module] = {}

    m = copy.deepcopy(base)
    lorazoo.inject(m, "lora", targets=TARGETS, r=INIT_R, alpha=ALPHA)
    models["lorazoo lora r=12"], steps["lorazoo lora r=12"] = m, lorazoo_step(m, ids, attach=False)
    for delta_t in (1, 10):
        key = f"lorazoo adalora Δt={delta_t}"
        m = copy.deepcopy(base)
        lorazoo.inject(
            m, "adalora", targets=TARGETS, r=INIT_R, target_r=TARGET_R, alpha=ALPHA, delta_t=delta_t
        )
        models[key], steps[key] = m, lorazoo_step(m, ids, attach=True)
    have_peft = peft_module() is not None
    if have_peft:
        for delta_t in (1, 10):
            key = f"PEFT adalora Δt={delta_t}"
            models[key], steps[key] = peft_step(base, ids, delta_t)
    for model in models.values():
        model.train()
    if args.memory_only:
        mem = {}
        for key, fn in steps.items():
            fn()  # optimizer state and importance statistics exist before the measured step
            mem[key] = peak_bytes(fn)
        print("MEMORY " + json.dumps(mem))
        return
    samples = paired(steps, repeats=repeats, warmup=1)
    argv = [sys.executable, *sys.argv, "--memory-only"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    mem = json.loads(proc.stdout.split("MEMORY ", 1)[1])
    ref = "lorazoo lora r=12"
    rows = []
    for key in steps:
        cpu = stats([x / y for x, y in zip(samples[key]["cpu"], samples[ref]["cpu"], strict=True)])
        step_s = stats(samples[key]["cpu"]).median
        peak = mem[key]
        mem_ratio = peak / mem[ref] if peak and mem[ref] else float("nan")
        targets = ""
        if key.startswith("lorazoo adalora"):
            targets = f"time {verdict(cpu, 1.25)}, memory {'met' if mem_ratio <= 1.15 else 'missed'}"
        rows.append([key, f"{step_s:.3f}", fmt(cpu), mib(peak), f"{mem_ratio:.3f}", targets])
    if have_peft:
        for delta_t in (1, 10):
            ours, theirs = f"lorazoo adalora Δt={delta_t}", f"PEFT adalora Δt={delta_t}"
            r = stats([x / y for x, y in zip(samples[ours]["cpu"], samples[theirs]["cpu"], strict=True)])
            rows.append([f"{ours} ÷ {theirs}", "", fmt(r), "", "", f"≤ 1: {verdict(r, 1.0)}"])
    else:
        rows.append(["PEFT adalora", NOT_INSTALLED, "", "", "", ""])
    table = markdown_table(
        ["step", "s (process)", "÷ LoRA r=12 (process)", "peak MiB", "peak ÷ LoRA", "targets"], rows
    )
    desc = f"{cfg.hidden_size}/{cfg.intermediate_size}/{cfg.num_layers}L, vocab {cfg.vocab_size}"
    print(f"AdaLoRA training step (small Llama {desc}, batch {batch[0]}×{batch[1] - 1}, init_r={INIT_R})")
    print(table)


if __name__ == "__main__":
    main()
