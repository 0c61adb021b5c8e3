"""What ``lorazoo bench`` prints and writes: the tables, ``results.json``, ``report.md``, a figure.

Every figure of a configuration is its mean over the seeds with the half-width of its 95 %
Student-t interval (``0.344 ± 0.021``); with one seed the table says so instead of inventing an
interval. The output folder is assembled under a temporary name beside its destination and
renamed into place at the end, so an interrupted or failed run leaves no half-written folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

COLUMNS = (
    "run",
    "lr",
    "r",
    "trainable",
    "file",
    "train tok/s",
    "speed vs LoRA",
    "peak mem",
    "learned bpb",
    "forgot bpb",
    "merge Δ",
    "unmerged/merged",
    "s/run",
)


def _bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _num(x: float, fmt: str, signed: bool) -> str:
    s = f"{x:+{fmt}}" if signed else f"{x:{fmt}}"
    return s.replace("-", "−")


def ci(iv: dict[str, Any] | None, fmt: str = ".3f", signed: bool = True) -> str:
    """``mean ± half-width`` of an interval dict; ``mean (1 seed)`` without an interval."""
    if iv is None:
        return "—"
    if iv.get("high") is None:
        return _num(iv["mean"], fmt, signed) + " (1 seed)"
    return f"{_num(iv['mean'], fmt, signed)} ± {_num(iv['high'] - iv['mean'], fmt, False)}"


def ci_bounds(iv: dict[str, Any], fmt: str = ".3f") -> str:
    """``mean [low, high]``, or ``mean (single seed, no interval)``."""
    if iv.get("high") is None:
        return f"{_num(iv['mean'], fmt, True)} (single seed, no interval)"
    return f"{_num(iv['mean'], fmt, True)} [{_num(iv['low'], fmt, True)}, {_num(iv['high'], fmt, True)}]"


def _lr(x: float | None) -> str:
    return "—" if x is None else f"{x:.0e}".replace("e-0", "e-")


def main_configs(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The configurations of the main table: every variant at the main rank, then full."""
    rank = result["recipe"]["rank"]
    configs = result["summary"]["configs"]
    return [c for c in configs if c["rank"] == rank] + [c for c in configs if c["name"] == "full"]


def config_cells(c: dict[str, Any]) -> list[str]:
    label = "full fine-tuning" if c["name"] == "full" else c["name"]
    file = _bytes(c.get("file_bytes"))
    speed = ci(c.get("speed_vs_lora"), ".2f", signed=False) if c.get("speed_vs_lora") else "—"
    if c["name"] == "lora":
        speed = "1 (reference)"
    merge = f"{c['merge_max_abs_diff']:.1e}" if "merge_max_abs_diff" in c else "—"
    lat = f"{c['latency_ratio']:.2f}×" if "latency_ratio" in c else "—"
    return [
        label,
        _lr(c["lr"]),
        str(c["r"]) if c.get("r") is not None else "—",
        f"{c['trainable']:,}",
        file,
        f"{c['tokens_per_s']['mean']:,.0f}",
        speed,
        _bytes(c.get("peak_memory_bytes")),
        ci(c["learned_bpb"]),
        ci(c["forgot_bpb"]),
        merge,
        lat,
        f"{c['run_seconds']['mean']:.1f}",
    ]


def markdown_table(header: list[str], rows: list[list[str]], numeric: list[bool] | None = None) -> str:
    cells = [header] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = numeric or [False] + [True] * (len(header) - 1)

    def line(row: list[str]) -> str:
        out = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)]
        return "| " + " | ".join(out) + " |"

    sep = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if num else (":" + "-" * (w + 1))
            for w, num in zip(widths, numeric, strict=True)
        )
        + "|"
    )
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def table(result: dict[str, Any]) -> str:
    """The main table (printed on stdout and copied into report.md): the base, every variant at
    the main rank and full fine-tuning, each figure as mean ± 95 % half-width over the seeds."""
    base = next(r for r in result["runs"] if r["name"] == "base")
    rows = [
        ["base (not adapted)", "—", "—", "0", "—", "—", "—", "—",
         f"target {base['target_bpb']:.3f}", f"source {base['source_bpb']:.3f}", "—", "—", "—"]
    ]  # fmt: skip
    rows += [config_cells(c) for c in main_configs(result)]
    return markdown_table(list(COLUMNS), rows)


def seeds_note(result: dict[str, Any]) -> str:
    n = len(result["seeds"])
    seeds = ", ".join(map(str, result["seeds"]))
    if n == 1:
        return f"seed {seeds}: single seed, no interval"
    return f"mean ± half-width of the 95 % Student-t interval over {n} seeds ({seeds})"


def versus_table(result: dict[str, Any]) -> str | None:
    """Each variant minus LoRA at the same rank, paired by seed."""
    rows = [
        [c["label"], ci_bounds(c["learned_vs_lora"]), ci_bounds(c["forgot_vs_lora"])]
        for c in result["summary"]["configs"]
        if c.get("learned_vs_lora")
    ]
    if not rows:
        return None
    return markdown_table(["run", "learned − LoRA (bpb)", "forgot − LoRA (bpb)"], rows)


def sweep_table(result: dict[str, Any]) -> str | None:
    sweep = result["summary"]["rank_sweep"]
    if not sweep:
        return None
    ranks = sorted({p["rank"] for pts in sweep.values() for p in pts})
    rows = []
    for name, pts in sweep.items():
        by = {p["rank"]: p["learned_bpb"] for p in pts}
        rows.append([name] + [ci(by.get(r)) if r in by else "—" for r in ranks])
    return markdown_table(["learned bpb at rank"] + [f"r={r}" for r in ranks], rows)


def claims_table(result: dict[str, Any]) -> str | None:
    claims = result["summary"]["claims"]
    if not claims:
        return None
    rows = []
    for c in claims:
        if c["checks"]:
            evidence = "; ".join(
                f"{k['check']}: Δ {ci_bounds(k['difference'], '.4g')} → {k['verdict']}" for k in c["checks"]
            )
        else:
            evidence = c.get("note", "")
        rows.append([c["variant"], c["statement"], c["verdict"].upper(), evidence])
    return markdown_table(["variant", "claim", "verdict", "evidence (paired by seed: a − ratio·b)"], rows,
                          [False, False, False, False])  # fmt: skip


def summary(result: dict[str, Any]) -> str:
    """Lines under the table: seeds, data sizes, base cache status, timings."""
    d = result["data"]
    t = result["timing"]
    base = result["base"]
    lines = [
        seeds_note(result),
        f"source domain {d['source']['name']}: train {d['source']['train_bytes']:,} B, "
        f"eval {d['source']['eval_bytes']:,} B; target domain {d['target']['name']}: "
        f"train {d['target']['train_bytes']:,} B, eval {d['target']['eval_bytes']:,} B",
    ]
    if result["model"].get("kind") == "bytes":
        if base["from_cache"]:
            lines.append(f"base: reused from the cache ({base['cache_file']})")
        else:
            p = base["pretrain"]
            lines.append(
                f"base: pre-trained {p['steps']} steps in {p['seconds']:.1f} s "
                f"(cpu {p['cpu_seconds']:.1f} s), cached at {base['cache_file']}"
            )
    v = result["versions"]
    lines.append(
        f"{len(result['runs']) - 1} runs; total {t['total_seconds']:.1f} s wall, "
        f"{t['total_cpu_seconds']:.1f} s process CPU, {result['threads']} thread(s), device {v['device']}, "
        f"torch {v['torch']}, lorazoo {v['lorazoo']}"
    )
    return "\n".join(lines)


def console(result: dict[str, Any]) -> str:
    """Everything printed on stdout."""
    parts = [table(result), "", seeds_note(result)]
    for title, body in (
        ("Paired by seed against LoRA at the same rank (mean [95 % interval]):", versus_table(result)),
        ("Rank sweep:", sweep_table(result)),
        ("Claims:", claims_table(result)),
    ):
        if body:
            parts += ["", title, body]
    parts += ["", summary(result)]
    return "\n".join(parts)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def rank_pictures(result: dict[str, Any]) -> str | None:
    """For each run that records the rank it kept per layer (AdaLoRA), the first seed's ranks as
    a bar per layer, with the budget of every mask."""
    blocks = []
    for x in result["runs"]:
        kept = x.get("ranks")
        if not kept or x.get("seed") != result["seeds"][0]:
            continue
        top = max(max(kept.values()), 1)
        width = max(len(p) for p in kept)
        lines = [
            f"{x['label']} (seed {x['seed']}): {sum(kept.values())} triplets kept over {len(kept)} layers"
        ]
        lines += [f"{p.ljust(width)}  {'█' * round(24 * k / top):<24} {k}" for p, k in kept.items()]
        history = x.get("rank_history") or []
        if history:
            lines.append(
                "budget per mask (step: kept): " + ", ".join(f"{m['step']}: {m['budget']}" for m in history)
            )
        blocks.append("```\n" + "\n".join(lines) + "\n```")
    return "\n\n".join(blocks) or None


def markdown(result: dict[str, Any], figure: str | None, figure_note: str) -> str:
    r = result["recipe"]
    d = result["data"]
    v = result["versions"]
    out = [
        "# lorazoo bench",
        "",
        f"Created {result['created']} with lorazoo {v['lorazoo']}, torch {v['torch']}, Python {v['python']} "
        f"on {v['platform']} ({v['machine']}, {result['threads']} thread(s), device {v['device']}).",
        "",
        table(result),
        "",
        seeds_note(result) + ". bpb: bits per byte on the held-out split; learned = base target bpb − run "
        "target bpb (higher is better); forgot = run source bpb − base source bpb (lower is better). "
        "speed vs LoRA: per-seed ratio of LoRA's training CPU time to the run's at the same rank "
        "(tokens per CPU second relative to LoRA; the wall-time ratio is in results.json). merge Δ: max "
        "|merged − unmerged| logit difference on an eval batch (largest over the seeds). unmerged/merged: "
        "median ratio of inference latency over interleaved pairs (first seed).",
    ]
    for title, body in (
        ("## Paired by seed against LoRA", versus_table(result)),
        ("## Rank sweep (learned bpb)", sweep_table(result)),
        ("## Claims", claims_table(result)),
        ("## Ranks kept per layer", rank_pictures(result)),
    ):
        if body:
            out += ["", title, "", body]
    out += [
        "",
        "## Setup",
        "",
        f"- model: {json.dumps(result['model'])}",
        f"- every run: {r['steps']} steps, batch {r['batch']} × {r['seq_len']} tokens, seeds "
        f"{', '.join(map(str, result['seeds']))}, targets {', '.join(r['targets'])}, AdamW, "
        f"{int(r['warmup'] * 100)}% warm-up then cosine to 10%",
        f"- seeds: {result['seed_rule']}",
        f"- rank: {result['rank_rule']}",
        "- source domain: "
        f"{d['source']['origin']} — train {d['source']['train_bytes']:,} B "
        f"({d['source']['train_documents']} files), eval {d['source']['eval_bytes']:,} B "
        f"({d['source']['eval_documents']} files)",
        "- target domain: "
        f"{d['target']['origin']} — train {d['target']['train_bytes']:,} B ({d['target']['train_documents']} "
        f"documents), eval {d['target']['eval_bytes']:,} B ({d['target']['eval_documents']} documents)",
        f"- evaluation: {r['eval_windows']} windows spread evenly over each eval split",
        f"- versions: {json.dumps(v)}",
        "",
        "## Times",
        "",
        summary(result).replace("\n", "  \n"),
        "",
        "| run | seed | train s | train CPU s | run s | train tok/s | learned bpb | forgot bpb |",
        "|:--|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for x in result["runs"]:
        if x.get("seed") is None:
            continue
        out.append(
            f"| {x['label']} | {x['seed']} | {x['train_seconds']:.1f} | {x['train_cpu_seconds']:.1f} "
            f"| {x['run_seconds']:.1f} | {x['tokens_per_s']:,.0f} | {x['learned_bpb']:+.3f} "
            f"| {x['forgot_bpb']:+.3f} |"
        )
    mem = next((x["memory_method"] for x in result["runs"] if "memory_method" in x), "")
    out += ["", f"Peak memory: {mem}.", "", "## Figure", ""]
    out += [f"![learned vs forgot, rank sweep, loss curves]({figure})" if figure else figure_note, ""]
    return "\n".join(out)


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def figure(result: dict[str, Any], path: Path) -> tuple[bool, str]:
    """Write the PNG when matplotlib is installed; otherwise say so.

    Panels: learned vs forgot per configuration at the main rank with 95 % interval bars (a
    legend, not labels beside the points, so ten or more runs stay readable); learned vs rank per
    variant when the bench ran several ranks; the mean training-loss curve per configuration at
    the main rank."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False, "No figure: matplotlib is not installed (pip install 'lorazoo[bench]')."
    summary_ = result["summary"]
    configs = summary_["configs"]
    sweep = summary_["rank_sweep"]
    names = list(dict.fromkeys(c["name"] for c in configs))
    # ten well-separated colours while they suffice; tab20's paired shades only beyond
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colour = {n: cmap(i % cmap.N) for i, n in enumerate(names)}
    ncols = 3 if sweep else 2
    fig, axes = plt.subplots(1, ncols, figsize=(6.0 * ncols, 5.2))
    ax1 = axes[0]

    def half(iv: dict[str, Any]) -> float:
        return 0.0 if iv.get("high") is None else iv["high"] - iv["mean"]

    for i, c in enumerate(main_configs(result)):  # other ranks: the rank-sweep panel
        x, y = c["forgot_bpb"], c["learned_bpb"]
        ax1.errorbar(
            x["mean"], y["mean"], xerr=half(x), yerr=half(y), fmt=_MARKERS[i % len(_MARKERS)],
            color=colour[c["name"]], ms=7, capsize=3, label=c["label"],
        )  # fmt: skip
    ax1.set_xlabel("forgot: source bpb − base (lower is better)")
    ax1.set_ylabel("learned: base − target bpb (higher is better)")
    ax1.set_title(f"learned vs forgot ({seeds_note(result)})", fontsize=9)
    ax1.legend(fontsize=7, ncol=2 if len(configs) > 10 else 1, loc="best", framealpha=0.8)
    ax1.grid(alpha=0.3)
    k = 1
    if sweep:
        ax = axes[1]
        for name, pts in sweep.items():
            rs = [p["rank"] for p in pts]
            ys = [p["learned_bpb"]["mean"] for p in pts]
            es = [half(p["learned_bpb"]) for p in pts]
            ax.errorbar(rs, ys, yerr=es, marker="o", capsize=3, color=colour[name], label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bench rank")
        ax.set_ylabel("learned: base − target bpb")
        ax.set_title("rank sweep (alpha at each config's default)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        k = 2
    ax = axes[k]
    main = {c["name"] for c in main_configs(result)}
    for name in names:
        if name not in main:
            continue
        curves = [
            r["curve"]
            for r in result["runs"]
            if r["name"] == name and r.get("curve") and r["rank"] in (None, result["recipe"]["rank"])
        ]
        if not curves:
            continue
        mean = [sum(v) / len(v) for v in zip(*curves, strict=True)]
        w = max(1, len(mean) // 10)
        smooth = [
            sum(mean[max(0, i - w + 1) : i + 1]) / len(mean[max(0, i - w + 1) : i + 1])
            for i in range(len(mean))
        ]
        ax.plot(range(1, len(smooth) + 1), smooth, color=colour[name], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss, nats/token (mean over seeds, trailing mean)")
    ax.set_title("target-domain training loss", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True, ""


def write_outputs(result: dict[str, Any], out: Path) -> Path:
    """Write the output folder atomically (temporary sibling, then rename). Returns ``out``.

    The folder gets the permissions a plain ``mkdir`` would (``0o777`` less the umask), not the
    owner-only mode of the temporary directory it is assembled in."""
    out = out.expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        files = result.get("_files", {})
        for rel, blob in files.items():
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(blob)
        ok, note = figure(result, tmp / "figure.png")
        doc = {k: v for k, v in result.items() if k != "_files"}
        doc["outputs"] = {
            "json": "results.json",
            "report": "report.md",
            "figure": "figure.png" if ok else None,
            "figure_note": note or None,
            "adapters": sorted(files),
            "table": table(result),
        }
        (tmp / "results.json").write_text(json.dumps(_json_safe(doc), indent=2) + "\n")
        (tmp / "report.md").write_text(markdown(result, "figure.png" if ok else None, note))
        if out.exists():
            if any(out.iterdir()):
                raise FileExistsError(
                    f"{out} was filled by something else while the bench ran; nothing was written"
                )
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
