"""NF4 storage and the NF4Linear base layer, side by side with bitsandbytes in one run.

Measured (one thread; bitsandbytes' OpenMP pinned to one thread as well):

1. quantising a 4096 × 11008 weight (the 7B MLP shape): ``lorazoo.quant.quantize_nf4`` ÷
   ``bitsandbytes.functional.quantize_4bit`` (NF4, block 64, with and without double
   quantisation; target ≤ 2×), and dequantising it (float32 and bfloat16 output);
2. ``NF4Linear`` forward ÷ dense ``nn.Linear`` forward on the small Llama's linear shapes
   (512×512, 1376×512, 512×1376; 4×128 tokens), fp32 and bf16, with bitsandbytes' ``Linear4bit``
   beside it;
3. base memory of the small Llama's linear layers (every ``nn.Linear`` but the output head),
   NF4 + double quantisation ÷ bf16, counted from the stored tensors (target ≤ 0.27);
4. relative quantisation error ``‖W − Ŵ‖_F / ‖W‖_F`` of NF4 vs symmetric int4 vs FP4 (E2M1),
   all absmax-scaled at block 64, on Gaussian and Laplace weights and on the linear weights of
   the ``lorazoo bench`` pre-trained base (read from its cache; ``--pretrain`` builds and caches
   it first with the bench's own recipe when it is missing);
5. stored bits per parameter with and without double quantisation.

Times are medians with the interquartile range in brackets, ratios formed per interleaved pair,
in process time.

    python benchmarks/bench_nf4.py [--quick] [--pretrain]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch / bitsandbytes load their runtimes

import argparse  # noqa: E402
import math  # noqa: E402

import torch  # noqa: E402
from _common import NOT_INSTALLED, fmt, markdown_table, paired, ratio, record, set_threads, stats, verdict  # noqa: E402
from torch import nn  # noqa: E402

import lorazoo  # noqa: E402
from lorazoo.bench.model import LLAMA_SMALL, LlamaLike  # noqa: E402
from lorazoo.quant import NF4Linear, dequantize_nf4, quantize_nf4  # noqa: E402


def bnb_functional():
    try:
        import bitsandbytes.functional as F
    except Exception:
        return None
    return F


def bnb_version() -> str | None:
    try:
        import bitsandbytes
    except Exception:
        return None
    return bitsandbytes.__version__


# ---- 1. quantise / dequantise ---------------------------------------------------------------------


def quant_rows(repeats: int, shape: tuple[int, int]) -> list[list[object]]:
    F = bnb_functional()
    rows: list[list[object]] = []
    torch.manual_seed(0)
    w32 = torch.randn(shape) * 0.02
    for dtype in (torch.float32, torch.bfloat16):
        w = w32.to(dtype)
        for dq in (True, False):
            label = f"quantise {shape[0]}×{shape[1]} {str(dtype)[6:]}, {'DQ' if dq else 'no DQ'}"
            cases = {"ours": lambda w=w, dq=dq: quantize_nf4(w, dq)}
            if F is not None:
                cases["bnb"] = lambda w=w, dq=dq: F.quantize_4bit(
                    w, blocksize=64, quant_type="nf4", compress_statistics=dq
                )
            s = paired(cases, repeats=repeats, warmup=1)
            ours = stats(s["ours"]["cpu"])
            if F is None:
                rows.append([label, fmt(ours, unit=" s"), NOT_INSTALLED, "–", "–"])
                continue
            r = ratio(s, "ours", "bnb", "cpu")
            rows.append(
                [label, fmt(ours, unit=" s"), fmt(stats(s["bnb"]["cpu"]), unit=" s"), fmt(r), verdict(r, 2.0)]
            )
    # dequantisation (double-quantised storage, the QLoRA default)
    q = quantize_nf4(w32, True)
    for dtype in (torch.float32, torch.bfloat16):
        label = f"dequantise {shape[0]}×{shape[1]} → {str(dtype)[6:]}"
        cases = {"ours": lambda dtype=dtype: dequantize_nf4(q, dtype)}
        if F is not None:
            packed, state = F.quantize_4bit(w32, blocksize=64, quant_type="nf4", compress_statistics=True)
            state.dtype = dtype
            assert torch.equal(F.dequantize_4bit(packed, state, quant_type="nf4"), dequantize_nf4(q, dtype))
            cases["bnb"] = lambda packed=packed, state=state: F.dequantize_4bit(
                packed, state, quant_type="nf4"
            )
        s = paired(cases, repeats=repeats, warmup=1)
        ours = stats(s["ours"]["cpu"])
        if F is None:
            rows.append([label, fmt(ours, unit=" s"), NOT_INSTALLED, "–", "–"])
            continue
        r = ratio(s, "ours", "bnb", "cpu")
        rows.append(
            [label, fmt(ours, unit=" s"), fmt(stats(s["bnb"]["cpu"]), unit=" s"), fmt(r), "(no target)"]
        )
    return rows


# ---- 2. forward ---------------------------------------------------------------------------------


def bnb_linear4bit(lin: nn.Linear, dtype: torch.dtype):
    try:
        import bitsandbytes as bnb
    except Exception:
        return None
    layer = bnb.nn.Linear4bit(
        lin.in_features,
        lin.out_features,
        bias=lin.bias is not None,
        compute_dtype=dtype,
        compress_statistics=True,
        quant_type="nf4",
    )
    layer.weight = bnb.nn.Params4bit(
        lin.weight.data.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4"
    )
    return layer.to("cpu").eval()


def forward_rows(repeats: int, tokens: int) -> list[list[object]]:
    d, f = LLAMA_SMALL.hidden_size, LLAMA_SMALL.intermediate_size
    rows: list[list[object]] = []
    for dtype in (torch.float32, torch.bfloat16):
        for d_out, d_in in ((d, d), (f, d), (d, f)):
            torch.manual_seed(0)
            lin = nn.Linear(d_in, d_out, bias=False).to(dtype)
            nf4 = NF4Linear.from_linear(lin)
            dense = nf4.to_linear().requires_grad_(False)
            x = torch.randn(tokens, d_in).to(dtype)
            assert torch.equal(nf4(x), dense(x))
            cases = {"dense": lambda x=x, m=dense: m(x), "nf4": lambda x=x, m=nf4: m(x)}
            b4 = bnb_linear4bit(lin, dtype)
            if b4 is not None:
                cases["bnb"] = lambda x=x, m=b4: m(x)
            with torch.no_grad():
                s = paired(cases, repeats=repeats, warmup=2)
            r = ratio(s, "nf4", "dense", "cpu")
            row = [
                f"{d_out}×{d_in} {str(dtype)[6:]}",
                fmt(stats(s["dense"]["cpu"]), unit=" ms", scale=1e3),
                fmt(stats(s["nf4"]["cpu"]), unit=" ms", scale=1e3),
                fmt(r),
            ]
            if b4 is not None:
                row += [fmt(ratio(s, "bnb", "dense", "cpu")), fmt(ratio(s, "nf4", "bnb", "cpu"))]
            else:
                row += [NOT_INSTALLED, "–"]
            rows.append(row)
    return rows


# ---- 3. memory ----------------------------------------------------------------------------------


def memory_row() -> list[object]:
    torch.manual_seed(0)
    model = LlamaLike(LLAMA_SMALL)
    params = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear))
    head = model.lm_head.weight.numel()
    lorazoo.quantize(model)  # all-linear: every nn.Linear but the output head
    stored = 0
    n_layers = 0
    for m in model.modules():
        if isinstance(m, NF4Linear):
            n_layers += 1
            stored += sum(t.numel() * t.element_size() for t in m.state_dict().values())
    quantised = params - head
    bf16 = 2 * quantised
    r = stored / bf16
    return [
        n_layers,
        f"{quantised / 1e6:.2f} M",
        f"{bf16 / 2**20:.2f} MiB",
        f"{stored / 2**20:.2f} MiB",
        f"{r:.4f}",
        "met" if r <= 0.27 else "missed",
    ]


# ---- 4. quantisation error ----------------------------------------------------------------------

INT4 = torch.arange(-7, 8, dtype=torch.float32) / 7  # symmetric int4: 15 levels, absmax -> 7
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FP4 = torch.cat([-E2M1.flip(0)[:-1], E2M1]) / 6  # FP4 E2M1, absmax -> 6


def _blockwise_error(w: torch.Tensor, levels: torch.Tensor) -> tuple[float, float]:
    """(squared error, squared norm) of absmax-scaled round-to-nearest at block 64."""
    flat = w.reshape(-1).double()
    pad = (-flat.numel()) % 64
    x = torch.nn.functional.pad(flat, (0, pad)).view(-1, 64)
    s = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-300)
    lv = levels.double()
    bounds = (lv[1:] + lv[:-1]) / 2
    q = lv[torch.bucketize(x / s, bounds)] * s
    return float((q - x).square().sum()), float(x.square().sum())


def error_of(weights: list[torch.Tensor]) -> dict[str, float]:
    acc = {k: [0.0, 0.0] for k in ("nf4", "nf4_dq", "int4", "fp4")}
    for w in weights:
        for name, dq in (("nf4", False), ("nf4_dq", True)):
            q = quantize_nf4(w, dq)
            acc[name][0] += float((dequantize_nf4(q, torch.float32).double() - w.double()).square().sum())
            acc[name][1] += float(w.double().square().sum())
        for name, lv in (("int4", INT4), ("fp4", FP4)):
            e, n = _blockwise_error(w, lv)
            acc[name][0] += e
            acc[name][1] += n
    return {k: math.sqrt(e / n) for k, (e, n) in acc.items()}


def bench_base_weights(pretrain: bool) -> tuple[list[torch.Tensor] | None, str]:
    """The linear weights of the ``lorazoo bench`` pre-trained base (the output head excluded)."""
    from lorazoo.bench import cache, runner
    from lorazoo.bench.backends import ByteBackend
    from lorazoo.bench.data import load_domains
    from lorazoo.bench.measure import Progress

    recipe = runner.DEFAULT
    source, _ = load_domains(
        recipe.seed,
        recipe.source_eval_bytes,
        recipe.target_eval_bytes,
        recipe.source_train_cap,
        recipe.target_train_cap,
    )
    key_recipe = {  # as lorazoo bench keys its cache
        "model": recipe.model.to_dict(),
        "seq_len": recipe.seq_len,
        "batch": recipe.batch,
        "pretrain_steps": recipe.pretrain_steps,
        "pretrain_lr": recipe.pretrain_lr,
        "seed": recipe.seed,
        "source_sha256": source.sha256(),
        "device": "cpu",
        "format": 1,
    }
    path = cache.base_path(cache.cache_dir(None), cache.key_of(key_recipe))
    blob = cache.load_base(path)
    if blob is not None:
        state = blob["state_dict"]
        how = f"cached bench base {path.name}"
    elif pretrain:
        backend = ByteBackend(recipe.model, torch.device("cpu"))
        windows = runner.Windows(backend.encode(source.train.data), recipe.seq_len, "source train")
        pre = runner._pretrain(
            backend, recipe, windows, torch.device("cpu"), Progress(recipe.pretrain_steps, enabled=False)
        )
        cache.save_base(path, backend.base_state, pre)
        state = backend.base_state
        how = f"bench base pre-trained now ({recipe.pretrain_steps} steps) and cached as {path.name}"
    else:
        return None, f"bench base not cached ({path}); run with --pretrain"
    model = LlamaLike(recipe.model)
    model.load_state_dict(state)
    head = model.get_output_embeddings()
    ws = [m.weight.detach().clone() for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    return ws, how


def error_rows(pretrain: bool, quick: bool) -> tuple[list[list[object]], str]:
    torch.manual_seed(0)
    n = (256, 1024) if quick else (1024, 4096)
    sets: list[tuple[str, list[torch.Tensor]]] = [
        (f"Gaussian {n[0]}×{n[1]}", [torch.randn(n) * 0.02]),
        (f"Laplace {n[0]}×{n[1]}", [torch.distributions.Laplace(0.0, 0.02).sample(n)]),
    ]
    base, how = bench_base_weights(pretrain)
    if base is not None:
        sets.append((f"bench base, {len(base)} linear weights", base))
    rows = []
    for name, ws in sets:
        e = error_of(ws)
        order = sorted(("nf4", "int4", "fp4"), key=lambda k: e[k])
        rows.append(
            [
                name,
                f"{e['nf4']:.4f}",
                f"{e['nf4_dq']:.4f}",
                f"{e['int4']:.4f}",
                f"{e['fp4']:.4f}",
                " < ".join(o.upper() for o in order),
            ]
        )
    return rows, how


# ---- 5. bits per parameter ----------------------------------------------------------------------


def bits_rows() -> list[list[object]]:
    torch.manual_seed(0)
    rows = []
    for shape in ((4096, 11008), (LLAMA_SMALL.hidden_size, LLAMA_SMALL.hidden_size)):
        w = torch.randn(shape)
        for dq in (False, True):
            q = quantize_nf4(w, dq)
            parts = ", ".join(f"{k} {t.numel() * t.element_size()} B" for k, t in q.tensors().items())
            rows.append([f"{shape[0]}×{shape[1]}", "yes" if dq else "no", f"{q.bits_per_param():.4f}", parts])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, smaller error sets (a smoke run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pretrain", action="store_true", help="pre-train and cache the bench base if missing")
    args = ap.parse_args()
    set_threads(args.threads)
    rq = 3 if args.quick else 5
    rf = 5 if args.quick else 11
    bnb = bnb_version()
    peer = f"bitsandbytes {bnb}" if bnb else "bitsandbytes not installed"

    rows = quant_rows(rq, (4096, 11008))
    record(
        "NF4: quantise and dequantise (1 thread)",
        markdown_table(["case", "lorazoo", "bitsandbytes", "lorazoo ÷ bnb", "target ≤ 2×"], rows),
        f"Process time per call; {peer}. Bytes checked equal before timing (dequantise).",
    )
    rows = forward_rows(rf, 4 * 128)
    record(
        "NF4Linear forward vs dense nn.Linear (small Llama shapes, 512 tokens, 1 thread)",
        markdown_table(
            [
                "shape (out×in) dtype",
                "dense",
                "NF4Linear",
                "NF4Linear ÷ dense",
                "bnb Linear4bit ÷ dense",
                "NF4Linear ÷ bnb",
            ],
            rows,
        ),
        f"Outputs checked bit-equal to the dense layer holding the dequantised weight; {peer}.",
    )
    row = memory_row()
    record(
        "NF4 base memory: small Llama linear layers",
        markdown_table(
            ["layers", "params", "bf16", "NF4 + DQ (stored tensors)", "NF4+DQ ÷ bf16", "target ≤ 0.27"], [row]
        ),
    )
    rows, how = error_rows(args.pretrain, args.quick)
    record(
        "Quantisation error at block 64: NF4 vs int4 vs FP4 (E2M1)",
        markdown_table(["weights", "NF4", "NF4 + DQ", "int4 (symmetric)", "FP4 (E2M1)", "order"], rows),
        "Relative error ‖W − Ŵ‖_F / ‖W‖_F, each block scaled by its absolute maximum, round to nearest; "
        f"trained weights: {how}.",
    )
    record(
        "NF4 stored bits per parameter",
        markdown_table(["shape", "double quantisation", "bits / param", "stored tensors"], bits_rows()),
    )


if __name__ == "__main__":
    main()
