"""QLoRA on the small Llama, side by side in one run: lorazoo's ``qlora`` (LoRA r=16 on NF4 bases)
against LoRA r=16 on the dense base, and against bitsandbytes ``Linear4bit`` bases + PEFT LoRA.

The model is ``LLAMA_SMALL`` of ``lorazoo.bench.model`` (hidden 512, intermediate 1376, 8 layers,
vocabulary 32000); the targets are every linear layer but the output head (56 layers), r=16,
alpha=32. Three models hold the same base and the same adapter factors:

* **QLoRA**: ``lorazoo.inject(model, "qlora", ...)``: NF4, block 64, double quantisation;
* **dense LoRA**: ``lorazoo.inject(model, "lora", ...)`` on dense ``nn.Linear`` layers holding the
  dequantised NF4 weights (so both compute the same function);
* **bnb + PEFT**: the same packed bytes in bitsandbytes ``Linear4bit`` layers
  (``lorazoo.quant.bnb.to_bnb``; NF4, block 64, double quantisation) with PEFT LoRA r=16
  (when bitsandbytes and PEFT are installed).

Per compute dtype (float32, bfloat16; adapters in float32 on the bfloat16 base, as both
libraries default to), interleaved rounds (A B C, C B A, ...) of

1. the unmerged forward (``no_grad``, eval mode): QLoRA ÷ dense LoRA (target ≤ 1.6× in fp32) and
   QLoRA ÷ bnb + PEFT (target ≤ 1.0);
2. a training step (forward, next-token cross-entropy, backward, AdamW step on the adapters,
   ``zero_grad``): QLoRA ÷ dense LoRA (target ≤ 1.5×) and QLoRA ÷ bnb + PEFT (target ≤ 1.0);

and, in the forward rounds, dequantising the 56 NF4 weights alone (into the compute dtype), which
is where QLoRA's time over dense LoRA goes. Outputs of the three are checked to agree first.
Last, base memory of the linear layers: NF4 + double quantisation ÷ bf16, counted from the stored
tensors (target ≤ 0.27; ``bench_nf4.memory_row``), with bitsandbytes' state dict beside it.

Ratios are formed per round and summarised as median [interquartile range], process time and
wall time separately; a verdict is ``met``/``missed`` when the whole range is on one side of the
target, else ``inconclusive``. bfloat16 matmuls are several times slower than float32 ones on a
CPU without bf16 instructions (and the output head's input gradient, a bf16 matmul over the
32000-word vocabulary, far slower still), so the bf16 rounds use fewer tokens (``--bf16-tokens``).

    python benchmarks/bench_qlora.py [--quick] [--repeats N] [--threads 1]
        [--fp32-tokens 4x128] [--bf16-tokens 1x32] [--budget 45]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch / bitsandbytes load their runtimes

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import (  # noqa: E402
    LLAMA_TARGETS,
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
from bench_nf4 import bnb_version, memory_row  # noqa: E402
from torch import nn  # noqa: E402

import lorazoo  # noqa: E402
from lorazoo.bench.model import LLAMA_SMALL, LlamaConfig, LlamaLike  # noqa: E402
from lorazoo.engine.inject import adapters_named  # noqa: E402
from lorazoo.quant import dequantize_nf4  # noqa: E402

R, ALPHA = 16, 32
FWD_TARGET, TRAIN_TARGET, PEER_TARGET = 1.6, 1.5, 1.0
CASES = ("qlora", "lora", "bnb")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the three models ---------------------------------------------------------------------------


def set_child(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def build(base: nn.Module, dtype: torch.dtype, with_bnb: bool) -> dict[str, nn.Module]:
    """QLoRA, dense LoRA on the dequantised weights and (``with_bnb``) bnb Linear4bit + PEFT,
    all holding the same adapter factors (random, so the adapters do not add zero)."""
    torch.manual_seed(1)
    qm = lorazoo.inject(copy.deepcopy(base), "qlora", targets="all-linear", r=R, alpha=ALPHA)
    with torch.no_grad():
        for _, _, a in adapters_named(qm, "default"):
            a.lora_B.copy_(torch.randn_like(a.lora_B) * 0.02)
    dense = copy.deepcopy(base)
    lorazoo.quantize(dense)  # the same recipe inject used: the same bytes
    lorazoo.dequantize(dense)  # dense nn.Linear layers holding dequant(Q)
    lm = lorazoo.inject(dense, "lora", targets="all-linear", r=R, alpha=ALPHA)
    mine = {p: a for p, _, a in adapters_named(qm, "default")}
    with torch.no_grad():
        for p, _, a in adapters_named(lm, "default"):
            a.lora_A.copy_(mine[p].lora_A)
            a.lora_B.copy_(mine[p].lora_B)
    models = {"qlora": qm.eval(), "lora": lm.eval()}
    if with_bnb:
        from lorazoo.quant.bnb import to_bnb

        peft = peft_module()
        bm = copy.deepcopy(base)
        for path, host, _ in adapters_named(qm, "default"):
            set_child(bm, path, to_bnb(host.nf4(), compute_dtype=dtype))
        pm = peft.get_peft_model(bm, peft_lora_config(R, ALPHA, LLAMA_TARGETS))
        theirs = dict(pm.named_parameters())
        with torch.no_grad():
            for path, a in mine.items():
                theirs[f"base_model.model.{path}.lora_A.default.weight"].copy_(a.lora_A)
                theirs[f"base_model.model.{path}.lora_B.default.weight"].copy_(a.lora_B)
        models["bnb"] = pm.eval()
    return models


def check_outputs(models: dict[str, nn.Module], ids: torch.Tensor, dtype: torch.dtype) -> str:
    with torch.no_grad():
        y = {k: m(ids).float() for k, m in models.items()}
    ref = y["qlora"]
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    notes = []
    for k in ("lora", "bnb"):
        if k not in y:
            continue
        err = (y[k] - ref).abs().max().item() / ref.abs().max().item()
        assert err <= tol, f"{k} output differs from QLoRA's by {err:.3g} (relative to max |logit|)"
        notes.append(f"{k} {err:.1g}")
    return ", ".join(notes)


# ---- timed calls --------------------------------------------------------------------------------


def forward_fn(model: nn.Module, ids: torch.Tensor):
    def run() -> None:
        with torch.no_grad():
            model(ids)

    return run


def step_fn(model: nn.Module, ids: torch.Tensor, opt: torch.optim.Optimizer):
    inp, tgt = ids[:, :-1], ids[:, 1:].reshape(-1)

    def run() -> None:
        logits = model(inp)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def dequant_fn(qm: nn.Module, dtype: torch.dtype):
    qs = [host.nf4() for _, host, _ in adapters_named(qm, "default")]

    def run() -> None:
        for q in qs:
            dequantize_nf4(q, dtype)

    return run


def rounds(cases: dict, repeats: int, budget: float, min_rounds: int = 3) -> dict:
    """Interleaved rounds through ``_common.paired`` (one warm-up round, then one round per call,
    the order reversed every other round), stopping after ``min_rounds`` once ``budget`` seconds
    have passed."""
    paired(cases, repeats=0, warmup=1)
    out = {k: {"wall": [], "cpu": []} for k in cases}
    t0 = time.perf_counter()
    for i in range(repeats):
        order = dict(reversed(list(cases.items()))) if i % 2 else cases
        s = paired(order, repeats=1, warmup=0)
        for k, v in s.items():
            out[k]["wall"] += v["wall"]
            out[k]["cpu"] += v["cpu"]
        if i + 1 >= min_rounds and time.perf_counter() - t0 > budget:
            break
    return out


def optimizer(model: nn.Module, lorazoo_model: bool) -> torch.optim.Optimizer:
    if lorazoo_model:
        return torch.optim.AdamW(lorazoo.param_groups(model, lr=1e-5))
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


# ---- one dtype ----------------------------------------------------------------------------------


def run_dtype(
    base32: nn.Module, cfg: LlamaConfig, dtype: torch.dtype, batch: int, seq: int, repeats: int, budget: float
) -> tuple[list[list[object]], list[str]]:
    with_bnb = peft_module() is not None and bnb_version() is not None
    base = copy.deepcopy(base32).to(dtype)
    log(f"[{str(dtype)[6:]}] building models")
    models = build(base, dtype, with_bnb)
    del base
    torch.manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    agree = check_outputs(models, ids[:, :-1], dtype)
    tokens = f"{batch}×{seq}"
    name = str(dtype)[6:]

    log(f"[{name}] forward rounds")
    cases = {k: forward_fn(m, ids[:, :-1]) for k, m in models.items()}
    cases["dequant"] = dequant_fn(models["qlora"], dtype)
    fwd = rounds(cases, repeats, budget / 3)

    log(f"[{name}] train-step rounds")
    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}
    assert len(set(trainable.values())) == 1, f"trainable parameter counts differ: {trainable}"
    for m in models.values():
        m.train()
    cases = {k: step_fn(m, ids, optimizer(m, k != "bnb")) for k, m in models.items()}
    train = rounds(cases, repeats, 2 * budget / 3)
    for m in models.values():
        m.eval()

    rows: list[list[object]] = []
    for what, samples, target in (("forward", fwd, FWD_TARGET), ("train step", train, TRAIN_TARGET)):
        for clock in ("cpu", "wall"):
            t = {k: stats(samples[k][clock]) for k in samples}
            vs_dense = ratio(samples, "qlora", "lora", clock)
            row = [
                f"{name}, {tokens}",
                what,
                clock,
                fmt(t["qlora"], unit=" s"),
                fmt(t["lora"], unit=" s"),
                f"{fmt(vs_dense)} (≤ {target}): {verdict(vs_dense, target)}",
            ]
            if with_bnb:
                vs_bnb = ratio(samples, "qlora", "bnb", clock)
                row += [fmt(t["bnb"], unit=" s"), f"{fmt(vs_bnb)}: {verdict(vs_bnb, PEER_TARGET)}"]
            else:
                row += [NOT_INSTALLED, "–"]
            rows.append(row)

    # Where QLoRA's extra time goes: dequantising the weights (once per forward, twice per step:
    # the backward dequantises again for the input gradient), and what the output head costs.
    def diff(samples: dict) -> str:
        return fmt(
            stats([q - d for q, d in zip(samples["qlora"]["cpu"], samples["lora"]["cpu"], strict=True)]),
            unit=" s",
        )

    n_nf4 = len(adapters_named(models["qlora"], "default"))
    dq = stats(fwd["dequant"]["cpu"])
    share = stats([d / q for d, q in zip(fwd["dequant"]["cpu"], fwd["qlora"]["cpu"], strict=True)])
    head_fwd, head_grad = head_costs(models["lora"], batch * seq, dtype)
    notes = [
        f"{name}, {tokens} (process time): dequantising the {n_nf4} NF4 weights takes {fmt(dq, unit=' s')}, "
        f"{fmt(share, digits=2)} of the QLoRA forward; QLoRA − dense LoRA: forward {diff(fwd)}, train "
        f"step {diff(train)} (which dequantises twice). The output head alone (not adapted, the same "
        f"in all three): forward {head_fwd:.3g} s, input gradient {head_grad:.3g} s (one call each). "
        f"Output agreement with QLoRA (max |Δ logit| ÷ max |logit|): {agree}. Rounds: forward "
        f"{len(fwd['qlora']['cpu'])}, train step {len(train['qlora']['cpu'])}."
    ]
    return rows, notes


def head_costs(model: nn.Module, tokens: int, dtype: torch.dtype) -> tuple[float, float]:
    """Process seconds of one call of the output head's forward ``x·Wᵀ`` and input gradient ``g·W``."""
    w = model.get_output_embeddings().weight.detach()
    x = torch.randn(tokens, w.shape[1], dtype=dtype)
    g = torch.randn(tokens, w.shape[0], dtype=dtype)
    out = []
    for fn in (lambda: F.linear(x, w), lambda: g @ w):
        c0 = time.process_time()
        fn()
        out.append(time.process_time() - c0)
    return out[0], out[1]


def bnb_base_bytes(cfg: LlamaConfig) -> int | None:
    """Bytes of the state dict of bitsandbytes ``Linear4bit`` layers (NF4, DQ) for the small
    Llama's linear layers but the head (every stored tensor, quantisation state included)."""
    if bnb_version() is None:
        return None
    from lorazoo.quant import NF4Linear
    from lorazoo.quant.bnb import to_bnb

    torch.manual_seed(0)
    total = 0
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = [(d, d)] * 4 + [(f, d)] * 2 + [(d, f)]
    for out_f, in_f in shapes:
        layer = to_bnb(NF4Linear.from_linear(nn.Linear(in_f, out_f, bias=False)))
        total += sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    return total * cfg.num_layers


def tokens_arg(text: str) -> tuple[int, int]:
    b, _, t = text.lower().partition("x")
    try:
        shape = int(b), int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCHxSEQ such as 4x128, got {text!r}") from None
    if min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"batch and sequence must be positive, got {text!r}")
    return shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="2 layers, vocabulary 2048, few tokens, 2 rounds (a smoke run)"
    )
    ap.add_argument("--repeats", type=int, default=5, help="rounds per measure (at most)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fp32-tokens", type=tokens_arg, default=(4, 128), help="batch x sequence (4x128)")
    ap.add_argument("--bf16-tokens", type=tokens_arg, default=(1, 32), help="batch x sequence (1x32)")
    ap.add_argument(
        "--budget", type=float, default=45.0, help="seconds of timed rounds per dtype (after 3 rounds)"
    )
    args = ap.parse_args()
    set_threads(args.threads)
    cfg = LLAMA_SMALL
    repeats, budget, t32, t16 = args.repeats, args.budget, args.fp32_tokens, args.bf16_tokens
    if args.quick:
        cfg = dataclasses.replace(LLAMA_SMALL, num_layers=2, vocab_size=2048)
        repeats, budget, t32, t16 = 2, 5.0, (1, 32), (1, 16)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    base32 = LlamaLike(cfg).eval()
    rows: list[list[object]] = []
    notes: list[str] = []
    for dtype, (batch, seq) in ((torch.float32, t32), (torch.bfloat16, t16)):
        r, n = run_dtype(base32, cfg, dtype, batch, seq, repeats, budget)
        rows += r
        notes += n
    bnb, peft = bnb_version(), peft_module()
    peer = (
        f"bitsandbytes {bnb} + PEFT {peft.__version__}"
        if bnb and peft
        else "bitsandbytes or PEFT not installed"
    )
    layers = f"{cfg.num_layers} layers" + (" (--quick)" if args.quick else "")
    record(
        f"QLoRA r={R} vs dense-base LoRA and bnb Linear4bit + PEFT (small Llama, {layers}, "
        f"{args.threads} thread)",
        markdown_table(
            [
                "dtype, tokens",
                "measure",
                "clock",
                "QLoRA",
                "dense LoRA",
                "QLoRA ÷ dense LoRA",
                "bnb + PEFT",
                "QLoRA ÷ bnb + PEFT (≤ 1.0)",
            ],
            rows,
        ),
        "Median [interquartile range] over interleaved rounds; ratios per round. All-linear targets "
        f"but the head, r={R}, alpha={ALPHA}; adapters in float32; train step = forward, "
        f"cross-entropy, backward, AdamW on the adapters. {peer}.\n\n" + "\n\n".join(notes),
    )
    row = memory_row()
    b = bnb_base_bytes(LLAMA_SMALL)
    bnb_cell = NOT_INSTALLED if b is None else f"{b / 2**20:.2f} MiB"
    record(
        "QLoRA base memory: small Llama linear layers (every nn.Linear but the head)",
        markdown_table(
            [
                "layers",
                "params",
                "bf16",
                "NF4 + DQ (stored tensors)",
                "NF4+DQ ÷ bf16",
                "target ≤ 0.27",
                "bnb Linear4bit state dict",
            ],
            [[*row, bnb_cell]],
        ),
        "The bitsandbytes column counts every tensor of its state dict, quantisation state included.",
    )
    log(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
