"""LoRA r=16 on GPT-2's ``c_attn`` (transformers' ``Conv1D``, weight stored in × out), lorazoo
side by side with PEFT (``fan_in_fan_out=True``) in one run.

Two cases: one GPT-2-small-shaped ``c_attn`` layer (768 → 2304) on 2 × 128 tokens, and a tiny
GPT-2 language model (hidden size 64, 2 layers, ``c_attn`` adapted in each) on 4 × 32 tokens.
Per case, interleaved rounds (A B, B A, ...) of

* the unmerged forward (``no_grad``, eval mode), and
* a training step (forward, mean-square loss, backward, SGD step, ``zero_grad``),

each summarised as the per-round ratio lorazoo ÷ PEFT, median [interquartile range] (target
≤ 0.8). Then merge exactness: lorazoo's merge → unmerge must give the base weight back bit for
bit; PEFT's ``merge_adapter`` → ``unmerge_adapter`` error on the base weight is measured. Both
models are checked to give the same output first.

    python benchmarks/bench_conv1d.py [--repeats N] [--threads 1] [--case layer|tiny|both]
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import fmt, markdown_table, paired, peft_module, ratio, record, set_threads, verdict
from torch import nn

import lorazoo
from lorazoo.engine.inject import adapters_named

R, ALPHA = 16, 32


class Attn(nn.Module):
    """GPT-2-small's ``c_attn`` alone."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_attn = Conv1D(3 * 768, 768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_attn(x)


class TinyGPT2(nn.Module):
    """A tiny GPT-2 returning logits (built from a config; no weights are downloaded)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=256,
            n_positions=64,
            n_embd=64,
            n_layer=2,
            n_head=4,
            tie_word_embeddings=False,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.lm = GPT2LMHeadModel(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits


def build(case: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if case == "layer":
        return Attn().eval(), torch.randn(2, 128, 768)
    return TinyGPT2().eval(), torch.randint(0, 256, (4, 32))


def trained_like(params) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.02)


def step_fn(model: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer):
    def run() -> None:
        loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def forward_fn(model: nn.Module, x: torch.Tensor):
    def run() -> None:
        with torch.no_grad():
            model(x)

    return run


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("c_attn.weight")}


def conv1d_weights(model: nn.Module) -> list[torch.Tensor]:
    from transformers.pytorch_utils import Conv1D

    return [m.weight for m in model.modules() if isinstance(m, Conv1D)]


def run_case(case: str, repeats: int, peft) -> list[list[object]]:
    base, x = build(case)
    lz = lorazoo.inject(copy.deepcopy(base), "lora", targets=["c_attn"], r=R, alpha=ALPHA)
    trained_like(p for p in lz.parameters() if p.requires_grad)
    pm = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True
        ),
    )
    # Same factors in both, so both compute the same thing.
    theirs = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for path, _host, a in adapters_named(lz, "default"):
            theirs[f"base_model.model.{path}.lora_A.default.weight"].copy_(a.lora_A)
            theirs[f"base_model.model.{path}.lora_B.default.weight"].copy_(a.lora_B)
        y_lz, y_pf = lz(x), pm(x)
    assert torch.allclose(y_lz, y_pf, rtol=1e-4, atol=1e-5), (y_lz - y_pf).abs().max()

    fwd = paired({"lorazoo": forward_fn(lz, x), "PEFT": forward_fn(pm, x)}, repeats=repeats)
    lz.train(), pm.train()
    opt_lz = torch.optim.SGD(lorazoo.param_groups(lz, lr=1e-4))
    opt_pf = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    train = paired({"lorazoo": step_fn(lz, x, opt_lz), "PEFT": step_fn(pm, x, opt_pf)}, repeats=repeats)
    lz.eval(), pm.eval()

    # Merge exactness on the trained adapters.
    before = [w.detach().clone() for w in conv1d_weights(lz)]
    lorazoo.merge(lz)
    lorazoo.unmerge(lz)
    lz_exact = all(torch.equal(a, b) for a, b in zip(before, conv1d_weights(lz), strict=True))
    before_pf = [w.detach().clone() for w in conv1d_weights(pm)]
    pm.merge_adapter()
    pm.unmerge_adapter()
    pf_err = max((a - b).abs().max().item() for a, b in zip(before_pf, conv1d_weights(pm), strict=True))

    label = "c_attn 768→2304, 2×128 tokens" if case == "layer" else "tiny GPT-2 (64, 2 layers), 4×32 tokens"
    rows = []
    for what, samples in (("unmerged forward", fwd), ("train step", train)):
        for clock in ("cpu", "wall"):
            rel = ratio(samples, "lorazoo", "PEFT", clock)
            rows.append([label, what, clock, fmt(rel), verdict(rel, 0.8)])
    rows.append(
        [
            label,
            "merge → unmerge",
            "-",
            f"lorazoo bit-exact: {'yes' if lz_exact else 'NO'}; PEFT max abs ΔW {pf_err:.3g}",
            "met" if lz_exact else "missed",
        ]
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--case", choices=("layer", "tiny", "both"), default="both")
    args = ap.parse_args()
    set_threads(args.threads)
    peft = peft_module()
    if peft is None:
        print("PEFT is not installed: nothing to compare against")
        return
    cases = ("layer", "tiny") if args.case == "both" else (args.case,)
    rows = [row for case in cases for row in run_case(case, args.repeats, peft)]
    record(
        f"LoRA r={R} on GPT-2's Conv1D c_attn vs PEFT (fan_in_fan_out), {args.threads} thread",
        markdown_table(["case", "measure", "clock", "lorazoo ÷ PEFT", "target ≤ 0.8"], rows),
        "Median [interquartile range] of the per-round ratio over interleaved rounds; `met`/`missed` "
        "when the whole range is on one side of the target, else `inconclusive`. Merge row: the base "
        "weights after merge then unmerge, compared with before.",
    )


if __name__ == "__main__":
    main()
