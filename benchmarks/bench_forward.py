"""Forward cost of LoRA over the base model: unmerged overhead ÷ the FLOP ratio, and merged ÷ base.

The theoretical minimum of the unmerged overhead is the FLOP ratio
``Σ 2·r·(d_in + d_out) / base FLOPs`` (per token; the base counts every linear layer, the
``lm_head`` included, plus the attention products ``4·t·d`` per layer). A figure of 1 means the
adapter costs exactly its arithmetic. On the mid Llama (1024/2752/4 layers, batch 4×128) the
overhead at r=8 is a few percent of a forward, within this machine's noise, so the script also
measures each layer shape alone (``nn.Linear`` vs the adapted layer, many repetitions) and larger
ranks, where the ratio is resolved. The merged model must cost what the base costs (1.00).

All cases are interleaved (base, lorazoo, PEFT, base, …); ratios are formed per pair; the
figures are medians with the interquartile range in brackets, in process time (single thread by
default; wall clock is reported beside it).

    python benchmarks/bench_forward.py [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import (
    NOT_INSTALLED,
    fmt,
    markdown_table,
    paired,
    peft_lora_config,
    peft_module,
    ratio,
    record,
    set_threads,
    stats,
    verdict,
)
from torch import nn

import lorazoo
from lorazoo.bench.model import LLAMA_MID, LlamaConfig, LlamaLike


def _randomise(model: nn.Module) -> None:
    """Non-zero ``B`` so that nothing is skipped for being zero."""
    with torch.no_grad():
        for _, _, a in lorazoo.engine.iter_adapters(model):
            a.lora_B.normal_(std=0.01)


def _peft_randomise(model: nn.Module) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.01)


def flop_ratio(cfg: LlamaConfig, r: int, t: int) -> float:
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    shapes = [(d, d)] * 4 + [(d, f), (d, f), (f, d)]
    adapter = L * sum(2 * r * (a + b) for a, b in shapes)
    base = L * (sum(2 * a * b for a, b in shapes) + 4 * t * d) + 2 * d * cfg.vocab_size
    return adapter / base


def _peft_merge(model: nn.Module) -> None:
    peft = peft_module()
    for m in model.modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            m.merge()


def model_rows(cfg: LlamaConfig, ranks: list[int], batch: tuple[int, int], repeats: int):
    peft = peft_module()
    torch.manual_seed(0)
    base = LlamaLike(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, batch)
    rows, merged_rows = [], []
    for r in ranks:
        ours = copy.deepcopy(base)
        lorazoo.inject(ours, "lora", targets="all-linear", r=r, alpha=2 * r)
        _randomise(ours)
        cases = {"base": lambda: base(ids), "lorazoo": lambda m=ours: m(ids)}
        theirs = None
        if peft is not None:
            theirs = copy.deepcopy(base)
            peft.inject_adapter_in_model(peft_lora_config(r, 2 * r), theirs)
            _peft_randomise(theirs)
            theirs.eval()
            cases["PEFT"] = lambda m=theirs: m(ids)
        with torch.no_grad():
            s = paired(cases, repeats=repeats, warmup=2)
        fr = flop_ratio(cfg, r, batch[1])
        for clock in ("cpu", "wall"):
            ov = stats([x / y - 1 for x, y in zip(s["lorazoo"][clock], s["base"][clock], strict=True)])
            per_flop = stats([v / fr for v in _overheads(s, "lorazoo", clock)])
            row = [
                r,
                clock,
                f"{100 * fr:.2f} %",
                f"{fmt(stats([100 * v for v in _overheads(s, 'lorazoo', clock)]))} %",
                fmt(per_flop),
            ]
            if theirs is not None:
                p_ov = _overheads(s, "PEFT", clock)
                row += [f"{fmt(stats([100 * v for v in p_ov]))} %", fmt(stats([v / fr for v in p_ov]))]
                # a ratio of two few-percent overheads is ill-conditioned per pair (a pair whose
                # PEFT overhead is ~0 or negative explodes it), so it is formed from the medians
                lz_med, pf_med = ov.median, stats(p_ov).median
                row.append(f"{lz_med / pf_med:.2f}" if pf_med > 0 else "—")
            else:
                row += [NOT_INSTALLED, NOT_INSTALLED, "—"]
            row.append(verdict(per_flop, 3.0) if ov.median > 0 else "inconclusive")
            rows.append(row)
        # merged ÷ base
        lorazoo.merge(ours)
        mcases = {"base": lambda: base(ids), "lorazoo merged": lambda m=ours: m(ids)}
        if theirs is not None:
            _peft_merge(theirs)
            mcases["PEFT merged"] = lambda m=theirs: m(ids)
        with torch.no_grad():
            ms = paired(mcases, repeats=repeats, warmup=1)
        for clock in ("cpu", "wall"):
            lz = ratio(ms, "lorazoo merged", "base", clock)
            pf = fmt(ratio(ms, "PEFT merged", "base", clock)) if theirs is not None else NOT_INSTALLED
            merged_rows.append([r, clock, fmt(lz), pf])
        del ours, theirs
    return rows, merged_rows


def _overheads(s, name: str, clock: str) -> list[float]:
    return [x / y - 1 for x, y in zip(s[name][clock], s["base"][clock], strict=True)]


def layer_rows(shapes, ranks, n_tokens: int, repeats: int, inner: int):
    """One layer alone: nn.Linear vs the adapted layer vs PEFT's, on ``n_tokens × d_in``."""
    peft = peft_module()
    rows = []
    for d_in, d_out in shapes:
        torch.manual_seed(0)
        lin = nn.Linear(d_in, d_out, bias=False)
        x = torch.randn(n_tokens, d_in)
        for r in ranks:
            ours = nn.Sequential(copy.deepcopy(lin))
            lorazoo.inject(ours, "lora", targets=nn.Linear, r=r, alpha=2 * r)
            _randomise(ours)
            cases = {"base": lambda lin=lin, x=x: lin(x), "lorazoo": lambda m=ours, x=x: m(x)}
            if peft is not None:
                theirs = nn.Sequential(copy.deepcopy(lin))
                peft.inject_adapter_in_model(peft_lora_config(r, 2 * r, ["0"]), theirs)
                _peft_randomise(theirs)
                cases["PEFT"] = lambda m=theirs, x=x: m(x)
            with torch.no_grad():
                s = paired(cases, repeats=repeats, warmup=3, inner=inner)
            fr = r * (d_in + d_out) / (d_in * d_out)
            lz = stats([v / fr for v in _overheads(s, "lorazoo", "cpu")])
            row = [
                f"{d_out}×{d_in}",
                r,
                f"{100 * fr:.2f} %",
                f"{fmt(stats([100 * v for v in _overheads(s, 'lorazoo', 'cpu')]))} %",
                fmt(lz),
            ]
            if peft is not None:
                pf = stats([v / fr for v in _overheads(s, "PEFT", "cpu")])
                row += [fmt(pf)]
            else:
                row += [NOT_INSTALLED]
            row.append(verdict(lz, 3.0))
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two layers, batch 2×64, few rounds")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    if args.quick:
        cfg = LlamaConfig(**{**LLAMA_MID.to_dict(), "num_layers": 1, "vocab_size": 2048})
        batch, repeats, lrep, inner, tokens = (2, 64), 3, 5, 2, 128
    else:
        cfg, batch, repeats, lrep, inner, tokens = LLAMA_MID, (4, 128), 25, 41, 5, 512
    d, f = cfg.hidden_size, cfg.intermediate_size
    ranks = [8, 16, 64]
    rows, merged_rows = model_rows(cfg, ranks, batch, repeats)
    lrows = layer_rows([(d, d), (d, f), (f, d)], [8, 16, 64, 256], tokens, lrep, inner)
    head = [
        "r",
        "clock",
        "FLOP ratio",
        "lorazoo overhead",
        "lorazoo ÷ FLOP ratio",
        "PEFT overhead",
        "PEFT ÷ FLOP ratio",
        "lorazoo ÷ PEFT overhead (medians)",
        "target ≤ 3× FLOP",
    ]
    table = markdown_table(head, rows)
    ltable = markdown_table(
        [
            "layer (d_out×d_in)",
            "r",
            "FLOP ratio",
            "lorazoo overhead",
            "lorazoo ÷ FLOP",
            "PEFT ÷ FLOP",
            "target ≤ 3×",
        ],
        lrows,
    )
    name = "mid Llama" if not args.quick else "1-layer mid Llama, vocab 2048"
    record(
        f"Unmerged forward overhead ÷ FLOP ratio (LoRA all-linear, {name}, "
        f"batch {batch[0]}×{batch[1]}, eval, no grad)",
        table + f"\n\nPer layer alone ({tokens} tokens, process time, {lrep} interleaved pairs "
        f"of {inner} calls):\n\n" + ltable,
        "Overheads are per pair (adapted / base − 1), median [interquartile range]. Where the range "
        "straddles the target the verdict says 'inconclusive'. Targets: ≤ 3× the FLOP ratio and ≤ half "
        "of PEFT's overhead ('lorazoo ÷ PEFT overhead' ≤ 0.5).",
    )
    record(
        f"Merged forward ÷ base forward (LoRA all-linear, {name}, batch {batch[0]}×{batch[1]})",
        markdown_table(["r", "clock", "lorazoo merged ÷ base", "PEFT merged ÷ base"], merged_rows),
        "Target 1.00: a merged layer runs the base layer's forward and nothing else.",
    )


if __name__ == "__main__":
    main()
