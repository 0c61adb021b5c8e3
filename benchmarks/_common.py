"""Shared helpers for the performance scripts: paired timing, machine facts, result files.

Timings on a shared, noisy machine: cases are interleaved (A B A B …) so drift hits them alike,
each case records wall time and process CPU time (``time.process_time``, which excludes time
stolen by other tenants), and the summary is a median with the interquartile spread. Ratios are
formed per pair (A_i / B_i) and then summarised, which cancels slow phases common to both.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "benchmarks.md"


@dataclass
class Stats:
    median: float
    q1: float
    q3: float
    n: int

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q3 - self.q1) / self.median if self.median else float("nan")

    def fmt(self, unit: str = "", scale: float = 1.0, digits: int = 3) -> str:
        return f"{self.median * scale:.{digits}g}{unit} (±{100 * self.spread / 2:.0f}%)"


def stats(values: list[float]) -> Stats:
    v = sorted(values)
    if len(v) == 1:
        return Stats(v[0], v[0], v[0], 1)
    q = statistics.quantiles(v, n=4)
    return Stats(statistics.median(v), q[0], q[2], len(v))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def paired(
    cases: dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 2, inner: int = 1
) -> dict[str, dict[str, list[float]]]:
    """Run every case ``repeats`` times, interleaved, after ``warmup`` rounds.

    Returns ``{case: {"wall": [...], "cpu": [...]}}`` in seconds per call (each sample is the
    mean over ``inner`` back-to-back calls, for very short cases).
    """
    out = {k: {"wall": [], "cpu": []} for k in cases}
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    _sync()
    for i in range(repeats):
        order = list(cases.items())
        if i % 2:
            order.reverse()  # alternate order so neither case always runs second
        for name, fn in order:
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(inner):
                fn()
            _sync()
            out[name]["wall"].append((time.perf_counter() - w0) / inner)
            out[name]["cpu"].append((time.process_time() - c0) / inner)
    return out


def ratio(samples: dict[str, dict[str, list[float]]], num: str, den: str, clock: str = "wall") -> Stats:
    """Per-pair ratio ``num_i / den_i``, summarised."""
    a, b = samples[num][clock], samples[den][clock]
    return stats([x / y for x, y in zip(a, b, strict=True)])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {dev}; torch {torch.__version__}, Python {platform.python_version()}"
    )


def peft_version() -> str | None:
    try:
        import peft  # noqa: F401
    except Exception:
        return None
    return peft.__version__


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def record(title: str, table: str, notes: str = "") -> None:
    """Print ``table`` and append it to ``docs/benchmarks.md`` with date, machine and command."""
    print(table)
    if notes:
        print(notes)
    if os.environ.get("LORAZOO_BENCH_NO_RECORD"):
        return
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    peft = peft_version()
    block = [
        f"\n## {title}\n",
        f"{stamp} · `{cmd}` · {machine()} · PEFT {peft or 'not installed'}\n",
        table,
    ]
    if notes:
        block.append("\n" + notes)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\nAppended by the scripts in `benchmarks/`; newest last. Each entry "
            "names the command, machine and versions that produced it.\n"
        )
    with RESULTS.open("a") as f:
        f.write("\n".join(block) + "\n")


# ---- shared by the engine benchmarks (inject, forward, merge, train, load) ---------------------

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def set_threads(n: int) -> None:
    """Pin intra-op threads. One thread by default: on a shared two-core machine a second
    thread mostly measures the neighbours, and ``process_time`` then sums both threads."""
    torch.set_num_threads(max(1, n))


def peft_module():
    """The ``peft`` module, or None when it is not installed (columns then say so)."""
    try:
        import peft
    except Exception:
        return None
    return peft


def peft_lora_config(r: int, alpha: float, targets: list[str] | None = None, **extra):
    peft = peft_module()
    assert peft is not None
    return peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets or LLAMA_TARGETS, **extra
    )


NOT_INSTALLED = "not installed"


def fmt(s: Stats, digits: int = 3, unit: str = "", scale: float = 1.0) -> str:
    """``median [q1–q3]``: the spread as the interquartile range, in the median's unit."""
    return f"{s.median * scale:.{digits}g}{unit} [{s.q1 * scale:.{digits}g}–{s.q3 * scale:.{digits}g}]"


def verdict(s: Stats, target: float, below: bool = True) -> str:
    """``met`` / ``missed`` when the whole interquartile range is on one side of ``target``,
    else ``inconclusive`` (the spread is larger than the distance to the target)."""
    lo, hi = s.q1, s.q3
    if below:
        return "met" if hi <= target else "missed" if lo > target else "inconclusive"
    return "met" if lo >= target else "missed" if hi < target else "inconclusive"


def sig_diff(a: Stats, b: Stats) -> bool:
    """True when the interquartile ranges of two figures do not overlap."""
    return a.q3 < b.q1 or b.q3 < a.q1
