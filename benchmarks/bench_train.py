"""One training step (forward, backward, AdamW) of each registered variant vs full fine-tuning.

Small Llama (512/1376/8 layers), batch 8×128, adapters on every linear layer but the head, r=16.
The 32000-token vocabulary is kept (``--vocab`` changes it): the ``lm_head`` is about 40 % of the
linear FLOPs, frozen under every variant, so a variant step still runs its forward and input
gradient. With the base frozen the backward skips every weight gradient, so a LoRA step costs
about (1 forward + 1 input-gradient) / (1 forward + 2 backward products) ≈ 0.67 of a full step.

Time: interleaved steps (full, lorazoo variants, PEFT), ratio per pair to the full step in the
same round, median [interquartile range]. Memory, in a separate process (CPU peaks need
malloc set up in a way that slows every allocation): the peak above the starting level during one
step (``benchmarks/_memory.py``: CUDA's counter, or the resident-set high-water mark on CPU) and
the bytes autograd saves for backward (exact).

    python benchmarks/bench_train.py [--quick] [--threads 1] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from collections.abc import Callable

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
from _memory import mib, peak_bytes, saved_bytes
from torch import nn

import lorazoo
from lorazoo.bench.model import LLAMA_SMALL, LlamaConfig, LlamaLike

R = 16
FLOOR = "floor: frozen base, input gradients only"


def _stepper(model: nn.Module, groups, ids: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW(groups, lr=1e-4)

    def step() -> None:
        loss = model.loss(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, vocab 2048, batch 2×64, few rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    set_threads(args.threads)
    if args.memory_only:
        # peak_bytes on CPU reads the resident-set high-water mark; it follows tensor memory
        # only once malloc's mmap threshold is pinned (its first call does it), and it must be
        # pinned before any allocation. Pinned, every large allocation is a system call, which
        # would slow the timed steps: so memory is measured in a separate process.
        peak_bytes(lambda: None)
    if args.quick:
        cfg = LlamaConfig(**{**LLAMA_SMALL.to_dict(), "num_layers": 2, "vocab_size": 2048})
        batch, repeats = (2, 65), args.repeats or 3
    else:
        cfg, batch, repeats = LLAMA_SMALL, (8, 129), args.repeats or 7
    if args.vocab:
        cfg = LlamaConfig(**{**cfg.to_dict(), "vocab_size": args.vocab})
    torch.manual_seed(0)
    base = LlamaLike(cfg)
    ids = torch.randint(0, cfg.vocab_size, batch)  # t+1 tokens: the loss shifts by one
    models: dict[str, nn.Module] = {}
    steps: dict[str, Callable[[], None]] = {}
    failed: dict[str, str] = {}

    full = copy.deepcopy(base)
    models["full"] = full
    steps["full"] = _stepper(full, full.parameters(), ids)
    # The floor of every adapter method: the frozen base, backward to the embedding output
    # (every input gradient, no weight gradient, no optimizer). What a variant costs beyond it
    # is its own work; what the floor costs beyond 0.67 is the elementwise work (softmax over
    # the vocabulary, norms, attention) that no method removes.
    floor = copy.deepcopy(base)
    floor.requires_grad_(False)
    floor.model.embed_tokens.register_forward_hook(lambda m, i, out: out.requires_grad_())
    models[FLOOR] = floor

    def floor_step(floor=floor) -> None:
        floor.loss(ids).backward()

    steps[FLOOR] = floor_step
    for name in lorazoo.variants():
        cls = lorazoo.variant(name)
        m = copy.deepcopy(base)
        try:
            lorazoo.inject(m, name, targets="all-linear", **{"r": R, "alpha": 2 * R, **cls.example_config})
            groups = lorazoo.param_groups(m, lr=1e-4)
            steps[f"lorazoo {name}"] = _stepper(m, groups, ids)
            models[f"lorazoo {name}"] = m
        except Exception as exc:  # a colleague's variant in progress must not stop the others
            failed[name] = f"{type(exc).__name__}: {exc}"[:120]
    peft = peft_module()
    peft_cases = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}
    if peft is not None:
        for name, extra in peft_cases.items():
            if name not in lorazoo.variants():
                continue
            m = copy.deepcopy(base)
            peft.inject_adapter_in_model(peft_lora_config(R, 2 * R, **extra), m)
            for n, p in m.named_parameters():
                p.requires_grad_("lora_" in n)
            steps[f"PEFT {name}"] = _stepper(m, [p for p in m.parameters() if p.requires_grad], ids)
            models[f"PEFT {name}"] = m
    for m in models.values():
        m.train()
    if args.memory_only:
        mem = {}
        for key, model in models.items():
            steps[key]()  # optimizer state exists before the measured step, as in training
            peak = peak_bytes(steps[key])
            saved = saved_bytes(lambda model=model: model.loss(ids), exclude=model.parameters())
            model.zero_grad()
            mem[key] = [peak, saved]
        print("MEMORY " + json.dumps(mem))
        return
    samples = paired(steps, repeats=repeats, warmup=1)
    argv = [sys.executable, *sys.argv, "--memory-only"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    mem = json.loads(proc.stdout.split("MEMORY ", 1)[1])
    rows = []
    for key in steps:
        cpu = [x / y for x, y in zip(samples[key]["cpu"], samples["full"]["cpu"], strict=True)]
        wall = [x / y for x, y in zip(samples[key]["wall"], samples["full"]["wall"], strict=True)]
        c, w = stats(cpu), stats(wall)
        fl = stats([x / y for x, y in zip(samples[key]["cpu"], samples[FLOOR]["cpu"], strict=True)])
        peak, saved = mem[key]
        step_s = stats(samples[key]["cpu"]).median
        target = verdict(c, 0.70) if key == "lorazoo lora" else ""
        rows.append([key, f"{step_s:.2f}", fmt(c), fmt(w), fmt(fl), mib(peak), mib(saved), target])
    if peft is None:
        rows.append(["PEFT", NOT_INSTALLED, "", "", "", "", "", ""])
    for name, why in failed.items():
        rows.append([f"lorazoo {name}", f"failed: {why}", "", "", "", "", "", ""])
    table = markdown_table(
        [
            "model",
            "step (s, process)",
            "÷ full (process)",
            "÷ full (wall)",
            "÷ floor (process)",
            "peak MiB",
            "saved for backward MiB",
            "LoRA target ≤ 0.70",
        ],
        rows,
    )
    desc = f"{cfg.hidden_size}/{cfg.intermediate_size}/{cfg.num_layers}L, vocab {cfg.vocab_size}"
    record(
        f"Training step vs full fine-tuning (small Llama {desc}, batch {batch[0]}×{batch[1] - 1}, r={R})",
        table,
        "Ratios per interleaved round to the full step of the same round; median [interquartile "
        "range]. The LoRA limit is ≈ 0.67 (no weight gradients; AdamW over a few parameters).",
    )


if __name__ == "__main__":
    main()
