"""What ``lorazoo bench`` prints and writes: the table, ``results.json``, ``report.md``, a figure.

The output folder is assembled under a temporary name beside its destination and renamed into
place at the end, so an interrupted or failed run leaves no half-written folder behind.
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
    "peak mem",
    "target bpb (learned)",
    "source bpb (forgot)",
    "merge Δ",
    "unmerged/merged",
)


def _bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def row_cells(row: dict[str, Any]) -> list[str]:
    name = row["name"]
    label = (
        {"base": "base (not adapted)", "full": "full fine-tuning"}.get(name, name)
        if row["kind"] == "baseline"
        else name
    )
    cfg = row.get("config") or {}
    lr = "—" if row.get("lr") is None else f"{row['lr']:.0e}".replace("e-0", "e-")
    rank = str(cfg.get("r", "—"))
    trainable = f"{row['trainable']:,}"
    file = _bytes(row.get("file_bytes")) if "file_bytes" in row else "—"
    tps = f"{row['tokens_per_s']:,.0f}" if "tokens_per_s" in row else "—"
    mem = _bytes(row.get("peak_memory_bytes")) if "tokens_per_s" in row else "—"
    if row["name"] == "base" and row["kind"] == "baseline":
        target = f"{row['target_bpb']:.3f}"
        source = f"{row['source_bpb']:.3f}"
    else:
        target = f"{row['target_bpb']:.3f} ({_signed(row['learned_bpb'])})"
        source = f"{row['source_bpb']:.3f} ({_signed(row['forgot_bpb'])})"
    merge = f"{row['merge_max_abs_diff']:.1e}" if "merge_max_abs_diff" in row else "—"
    lat = f"{row['latency_ratio']:.2f}×" if "latency_ratio" in row else "—"
    return [label, lr, rank, trainable, file, tps, mem, target, source, merge, lat]


def table(result: dict[str, Any]) -> str:
    """The results as a Markdown table (printed on stdout and copied into report.md)."""
    rows = [list(COLUMNS)] + [row_cells(r) for r in result["runs"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    numeric = [False] + [True] * (len(COLUMNS) - 1)

    def line(cells: list[str]) -> str:
        out = []
        for c, w, num in zip(cells, widths, numeric, strict=True):
            out.append(c.rjust(w) if num else c.ljust(w))
        return "| " + " | ".join(out) + " |"

    sep = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if num else (":" + "-" * (w + 1))
            for w, num in zip(widths, numeric, strict=True)
        )
        + "|"
    )
    return "\n".join([line(rows[0]), sep] + [line(r) for r in rows[1:]])


def summary(result: dict[str, Any]) -> str:
    """Lines under the table: data sizes, base cache status, timings."""
    d = result["data"]
    t = result["timing"]
    base = result["base"]
    lines = [
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
    lines.append(
        f"total {t['total_seconds']:.1f} s wall, {t['total_cpu_seconds']:.1f} s process CPU, "
        f"{result['threads']} thread(s), device {result['versions']['device']}"
    )
    return "\n".join(lines)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def markdown(result: dict[str, Any], figure: str | None, figure_note: str) -> str:
    r = result["recipe"]
    d = result["data"]
    v = result["versions"]
    runs = [x for x in result["runs"] if "train_seconds" in x]
    out = [
        "# lorazoo bench",
        "",
        f"Created {result['created']} with lorazoo {v['lorazoo']}, torch {v['torch']}, Python {v['python']} "
        f"on {v['platform']} ({v['machine']}, {result['threads']} thread(s), device {v['device']}).",
        "",
        table(result),
        "",
        "bpb: bits per byte on the held-out split; learned = base target bpb − run target bpb "
        "(higher is better); forgot = run source bpb − base source bpb (lower is better). "
        "merge Δ: max |merged − unmerged| logit difference on an eval batch. unmerged/merged: median "
        "ratio of inference latency over interleaved pairs.",
        "",
        "## Setup",
        "",
        f"- model: {json.dumps(result['model'])}",
        f"- every run: {r['steps']} steps, batch {r['batch']} × {r['seq_len']} tokens, seed {r['seed']}, "
        f"targets {', '.join(r['targets'])}, AdamW, {int(r['warmup'] * 100)}% warm-up then cosine to 10%",
        f"- rank: {result['rank_rule']}",
        "- source domain: "
        f"{d['source']['origin']} — train {d['source']['train_bytes']:,} B "
        f"({d['source']['train_documents']} files), eval {d['source']['eval_bytes']:,} B "
        f"({d['source']['eval_documents']} files)",
        "- target domain: "
        f"{d['target']['origin']} — train {d['target']['train_bytes']:,} B ({d['target']['train_documents']} "
        f"documents), eval {d['target']['eval_bytes']:,} B ({d['target']['eval_documents']} documents)",
        f"- evaluation: {r['eval_windows']} windows spread evenly over each eval split",
        "",
        "## Times",
        "",
        summary(result).replace("\n", "  \n"),
        "",
        "| run | train s | train CPU s | peak memory method |",
        "|:--|--:|--:|:--|",
    ]
    for x in runs:
        out.append(
            f"| {x['name']} | {x['train_seconds']:.1f} | {x['train_cpu_seconds']:.1f} "
            f"| {x['memory_method']} |"
        )
    out += ["", "## Figure", "", f"![learned vs forgot]({figure})" if figure else figure_note, ""]
    return "\n".join(out)


def figure(result: dict[str, Any], path: Path) -> tuple[bool, str]:
    """Write the PNG when matplotlib is installed; otherwise say so."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False, "No figure: matplotlib is not installed (pip install 'lorazoo[bench]')."
    runs = result["runs"]
    # One colour per run in both panels, so a point and its loss curve read as the same run.
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {x["name"]: palette[i % len(palette)] for i, x in enumerate(runs)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for x in runs:
        ax1.scatter(x["forgot_bpb"], x["learned_bpb"], s=40, color=colour[x["name"]])
        ax1.annotate(
            x["name"], (x["forgot_bpb"], x["learned_bpb"]), textcoords="offset points", xytext=(4, 4)
        )
    ax1.set_xlabel("forgot: source bpb − base (lower is better)")
    ax1.set_ylabel("learned: base − target bpb (higher is better)")
    ax1.axhline(0, color="grey", lw=0.5)
    ax1.axvline(0, color="grey", lw=0.5)
    ax1.set_title("learned vs forgot")
    for x in runs:
        curve = x.get("curve")
        if curve:
            k = max(1, len(curve) // 50)
            smooth = [sum(curve[i : i + k]) / len(curve[i : i + k]) for i in range(0, len(curve), k)]
            steps = [i * k for i in range(len(smooth))]
            ax2.plot(steps, smooth, label=x["name"], color=colour[x["name"]])
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss (nats/token)")
    ax2.set_title("target-domain training loss")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True, ""


def write_outputs(result: dict[str, Any], out: Path) -> Path:
    """Write the output folder atomically (temporary sibling, then rename). Returns ``out``."""
    out = out.expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
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
