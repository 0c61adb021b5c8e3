"""DoRA's cost next to LoRA (and PEFT's DoRA when ``peft`` imports), unmerged, at r = 16.

Four tables, every ratio formed per interleaved pair and summarised as median (± half the
interquartile spread), on process CPU time (immune to time stolen by other tenants) and wall time:

1. one layer (1024×1024 and 4096×4096, fp32, 4×128 tokens, input that needs its gradient):
   forward + backward time, peak memory and bytes saved for backward, DoRA / LoRA (and
   PEFT DoRA / lorazoo DoRA);
2. a training step (forward, backward, AdamW) of the small Llama (512/1376/8 layers, batch
   8×128, every linear layer adapted): the same figures;
3. inference: the unmerged forward of the small Llama with DoRA, LoRA and PEFT's DoRA, relative
   to the base model's forward;
4. the row norm ``‖W + s·B·A‖_row``: the identity lorazoo uses against forming ``W + s·B·A``,
   by layer size; the crossover is where ``plugins/dora.py`` switches (``DENSE_MAX_NUMEL``).

Targets: DoRA ≤ 1.10× LoRA in step time and peak memory; unmerged DoRA forward ≤ 1.15× the
base model's (PEFT measured 1.24×, 1.38×, 1.61×).

    python benchmarks/bench_dora.py [--quick] [--threads N] [--dtype float32|bfloat16]
                                    [--only train,forward,norm] [--repeats N]
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import statistics
from collections.abc import Callable

import torch
from _common import markdown_table, paired, ratio, record, stats
from _memory import mib, peak_bytes, saved_bytes
from lorazoo_plugins import dora as dora_plugin
from torch import nn

import lorazoo
from lorazoo.bench.model import LLAMA_SMALL, LlamaLike

R, ALPHA = 16, 32
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_dora(model: nn.Module, targets: list[str]) -> tuple[nn.Module | None, str]:
    """``model`` with PEFT's DoRA injected, or None and the reason it is unavailable."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except Exception as exc:  # not installed, or an incompatible version
        return None, f"PEFT unavailable ({type(exc).__name__}: {exc})"
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, use_dora=True, lora_dropout=0.0)
    model = inject_adapter_in_model(cfg, model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    return model, ""


def perturb(model: nn.Module) -> None:
    """Move every adapter tensor off its initial value (B = 0 would make DoRA's norm trivial)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name):
                p.add_(torch.randn(p.shape, generator=g).to(p) * 1e-3)


class Layer(nn.Module):
    def __init__(self, d: int, dtype: torch.dtype):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False, dtype=dtype)


def median_peak(fn: Callable[[], object], n: int) -> int | None:
    peaks = [peak_bytes(fn) for _ in range(n)]
    if any(p is None for p in peaks):
        return None
    return int(statistics.median(peaks))


def fmt_ratio(samples, num: str, den: str) -> tuple[str, str]:
    return ratio(samples, num, den, "cpu").fmt("×"), ratio(samples, num, den, "wall").fmt("×")


def mem_ratio(a: int | None, b: int | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.3f}×"


def layer_step(m: nn.Module, x: torch.Tensor, gout: torch.Tensor) -> Callable[[], None]:
    def fn() -> None:
        x.grad = None
        m.proj(x).backward(gout)
        for p in m.parameters():
            p.grad = None

    return fn


def ms_pair(samples, num: str, den: str, scale: float = 1e3) -> str:
    a, b = stats(samples[num]["cpu"]).median, stats(samples[den]["cpu"]).median
    return f"{a * scale:.1f} / {b * scale:.1f}"


Finish = Callable[[], tuple[str, list[str]]]
PAIRS = (("dora", "lora", "DoRA / LoRA"), ("peft-dora", "dora", "PEFT DoRA / DoRA"))
Setup = tuple[dict[str, Callable[[], None]], dict[str, Callable[[], int]], list[str]]


def llama_models(dtype: torch.dtype) -> tuple[nn.Module, dict[str, nn.Module], list[str]]:
    torch.manual_seed(0)
    base = LlamaLike(LLAMA_SMALL, dtype=dtype)
    models: dict[str, nn.Module] = {}
    for name in ("lora", "dora"):
        m = copy.deepcopy(base)
        lorazoo.inject(m, name, targets="all-linear", r=R, alpha=ALPHA)
        models[name] = m
    notes = []
    pm, why = peft_dora(copy.deepcopy(base), LLAMA_TARGETS)
    if pm is not None:
        models["peft-dora"] = pm
    else:
        notes.append(why)
    for m in models.values():
        perturb(m)
    return base, models, notes


def setup(kind: str, dtype: torch.dtype) -> Setup:
    """Training cases (one step each) and, per case, a function counting bytes saved for
    backward: ``kind`` is ``"layer<d>"`` (one d×d layer) or ``"llama"`` (the small Llama)."""
    cases: dict[str, Callable[[], None]] = {}
    saved: dict[str, Callable[[], int]] = {}
    if kind == "llama":
        _, models, notes = llama_models(dtype)
        ids = torch.randint(0, LLAMA_SMALL.vocab_size, (8, 129), generator=torch.Generator().manual_seed(0))
        for name, m in models.items():
            m.train()
            opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)

            def fn(m: nn.Module = m, opt: torch.optim.Optimizer = opt) -> None:
                m.loss(ids).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            cases[name] = fn
            saved[name] = lambda m=m: saved_bytes(lambda: m.loss(ids), exclude=m.parameters())
        return cases, saved, notes
    d = int(kind.removeprefix("layer"))
    torch.manual_seed(0)
    base = Layer(d, dtype)
    x = torch.randn(4, 128, d, dtype=dtype, requires_grad=True)
    gout = torch.randn(4, 128, d, dtype=dtype)
    models = {}
    for name in ("lora", "dora"):
        m = copy.deepcopy(base)
        lorazoo.inject(m, name, targets=["proj"], r=R, alpha=ALPHA)
        models[name] = m
    notes = []
    pm, why = peft_dora(copy.deepcopy(base), ["proj"])
    if pm is not None:
        models["peft-dora"] = pm
    else:
        notes.append(why)
    for name, m in models.items():
        perturb(m)
        m.train()
        cases[name] = layer_step(m, x, gout)
        saved[name] = lambda m=m: saved_bytes(lambda: m.proj(x), exclude=[*m.parameters(), x])
    return cases, saved, notes


def memory_child(kind: str, dtype_name: str) -> dict[str, tuple[int | None, int]]:
    """Peak and saved bytes per case, in a fresh process: the CPU peak needs malloc pinned
    before anything is allocated (benchmarks/_memory.py), and pinning it in the timing process
    would slow every allocation there."""
    peak_bytes(lambda: None)  # pins malloc first
    torch.set_num_threads(1)
    cases, saved, _ = setup(kind, getattr(torch, dtype_name))
    out = {}
    for name, fn in cases.items():
        fn()  # optimizer state and caches exist before measuring
        out[name] = (median_peak(fn, 3), saved[name]())
    return out


def memory(kind: str, dtype: torch.dtype) -> dict[str, tuple[int | None, int]]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(memory_child, (kind, str(dtype).replace("torch.", "")))


def bench_training(args, dtype: torch.dtype, kinds: list[str]) -> Finish:
    """Times now; the returned ``finish()`` measures memory and builds the table."""
    timed, notes = [], []
    for kind in kinds:
        cases, _, why = setup(kind, dtype)
        notes += [n for n in why if n not in notes]
        repeats = max(5, args.repeats // 2) if kind == "llama" else args.repeats
        timed.append((kind, paired(cases, repeats=repeats, warmup=2)))

    def finish() -> tuple[str, list[str]]:
        rows = []
        for kind, samples in timed:
            mem = memory(kind, dtype)
            label = "small Llama step" if kind == "llama" else f"{kind.removeprefix('layer')}² layer"
            for num, den, what in (
                ("dora", "lora", "DoRA / LoRA"),
                ("peft-dora", "dora", "PEFT DoRA / DoRA"),
            ):
                if num not in samples:
                    continue
                cpu, wall = fmt_ratio(samples, num, den)
                (pn, sn), (pd, sd) = mem[num], mem[den]
                rows.append(
                    [
                        label,
                        what,
                        cpu,
                        wall,
                        mem_ratio(pn, pd),
                        mem_ratio(sn, sd),
                        ms_pair(samples, num, den),
                        f"{mib(pn)} / {mib(pd)}",
                        f"{mib(sn)} / {mib(sd)}",
                    ]
                )
        header = ["case", "ratio", "time (CPU)", "time (wall)", "peak mem", "saved for bwd"]
        header += ["ms CPU", "peak MiB", "saved MiB"]
        return markdown_table(header, rows), notes

    return finish


def bench_forward(args, dtype: torch.dtype) -> Finish:
    base, models, notes = llama_models(dtype)
    ids = torch.randint(0, LLAMA_SMALL.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
    everything = {"base": base, **models}
    for m in everything.values():
        m.eval()

    def fwd(m: nn.Module) -> Callable[[], None]:
        def fn() -> None:
            with torch.no_grad():
                m(ids)

        return fn

    samples = paired({k: fwd(m) for k, m in everything.items()}, repeats=args.repeats, warmup=2)
    rows = []
    for name in models:
        cpu, wall = fmt_ratio(samples, name, "base")
        rows.append([name, cpu, wall, f"{stats(samples[name]['cpu']).median * 1e3:.0f}"])
    rows.append(["base", "1×", "1×", f"{stats(samples['base']['cpu']).median * 1e3:.0f}"])
    table = markdown_table(["unmerged forward", "/ base (CPU)", "/ base (wall)", "ms CPU"], rows)
    return lambda: (table, notes)


def bench_norm(args) -> Finish:
    shapes = [(16, 16), (32, 32), (64, 64), (128, 128), (64, 512), (256, 256), (512, 512), (1376, 512)]
    if not args.quick:
        shapes += [(1024, 1024), (4096, 4096)]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for d_out, d_in in shapes:
            r = min(R, d_out, d_in)
            g = torch.Generator().manual_seed(0)
            w = torch.randn(d_out, d_in, generator=g).to(dtype)
            a = torch.randn(r, d_in, generator=g) / d_in**0.5
            b = torch.randn(d_out, r, generator=g) * 0.01
            wsq = dora_plugin.row_sq_norms(w)

            def run(method: str, w=w, a=a, b=b, wsq=wsq) -> Callable[[], None]:
                def fn() -> None:
                    with torch.no_grad():
                        dora_plugin.row_norms(w, a, b, 2.0, wsq=wsq, method=method)

                return fn

            inner = max(1, min(200, 2_000_000 // (d_out * d_in)))
            samples = paired(
                {"identity": run("identity"), "dense": run("dense")},
                repeats=args.repeats,
                warmup=2,
                inner=inner,
            )
            rt = ratio(samples, "identity", "dense", "cpu")
            rows.append(
                [
                    str(dtype).replace("torch.", ""),
                    f"{d_out}×{d_in}",
                    f"{stats(samples['identity']['cpu']).median * 1e6:.0f}",
                    f"{stats(samples['dense']['cpu']).median * 1e6:.0f}",
                    rt.fmt("×"),
                    dora_plugin.norm_method(d_out, d_in),
                ]
            )
    header = ["weight", "shape", "identity µs", "dense µs", "identity / dense (CPU)", "lorazoo uses"]
    table = markdown_table(header, rows)
    return lambda: (table, [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, no 4096×4096 layer")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared box)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--only", default="train,forward,norm", help="comma-separated tables to run")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 15, --quick 5)")
    args = ap.parse_args()
    args.repeats = args.repeats or (5 if args.quick else 15)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    only = set(args.only.split(","))
    where = f"{args.dtype}, {args.threads} thread(s), r={R}, α={ALPHA}"
    plan = [
        ("forward", f"Unmerged forward vs base model, small Llama ({where}, batch 8×128)", bench_forward),
        ("norm", f"DoRA row norm: identity vs dense W + s·B·A ({args.threads} thread(s))", None),
        ("train", f"DoRA vs LoRA, training (fwd + bwd; Llama step with AdamW, 8×128) ({where})", None),
    ]
    # All timing first: measuring peak memory on CPU pins malloc's mmap threshold for the rest
    # of the process (benchmarks/_memory.py), which would slow every later allocation.
    done = []
    for key, title, fn in plan:
        if key in only:
            if key == "train":
                kinds = [f"layer{d}" for d in ([1024] if args.quick else [1024, 4096])] + ["llama"]
                done.append((title, bench_training(args, dtype, kinds)))
            else:
                done.append((title, bench_norm(args) if fn is None else fn(args, dtype)))
    for title, finish in done:
        table, notes = finish()
        record(title, table, "\n".join(notes))


if __name__ == "__main__":
    main()
