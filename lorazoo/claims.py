"""A paper's qualitative claims about a variant, as data the bench can check.

A variant declares its claims on the class (``Variant.claims``); ``lorazoo bench --claims``
plans the runs they need and evaluates each on the measured figures, paired by seed::

    from lorazoo.claims import Claim, Compare, Ref

    class DoRA(lorazoo.Variant):
        claims = (
            Claim(
                "learns at least as much as LoRA at equal rank",
                paper="Liu et al., arXiv 2402.09353",
                checks=(Compare("learned_bpb", Ref("dora"), ">", Ref("lora"), slack=0.01),),
            ),
        )

A :class:`Compare` reads one metric from two runs of the same seed, forms the per-seed
difference ``d = a − ratio·b`` and asks whether ``d > −slack`` (relation ``">"``) or
``d < slack`` (relation ``"<"``). Over the seeds, the mean of ``d`` and its 95 % Student-t
interval decide: the whole interval on the claimed side **holds**, the whole interval on the
other side **fails**, an interval across the line is **inconclusive**. One seed gives no interval
and is always inconclusive. A claim holds when every check holds, fails when any check fails,
and is inconclusive otherwise.

Metrics of a run (``METRICS``): ``learned_bpb`` (base − run target bits per byte),
``forgot_bpb`` (run − base source bits per byte), ``target_bpb``, ``source_bpb``,
``trainable`` (parameters), ``tokens_per_s`` (training throughput), ``early_loss`` (mean
training loss over the first quarter of the steps) and ``final_loss`` (over the last tenth).
One metric compares two curves: ``steps_to_loss`` — for each run, the first step at which its
training loss (a trailing mean over a tenth of the steps) reaches ``b``'s final loss; a run that
never reaches it counts as one step more than it ran.

A :class:`Ref` names a run by variant (or ``"full"`` for full fine-tuning) and, optionally, the
bench rank it runs at (``None``: the bench's ``--rank``). Every run a claim names is added to the
bench's plan, so a claim about rank 64 makes the bench train at rank 64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .errors import LorazooError

METRICS = (
    "learned_bpb",
    "forgot_bpb",
    "target_bpb",
    "source_bpb",
    "trainable",
    "tokens_per_s",
    "early_loss",
    "final_loss",
    "steps_to_loss",
)

HOLDS, FAILS, INCONCLUSIVE = "holds", "fails", "inconclusive"


class ClaimError(LorazooError, ValueError):
    """A claim that cannot be evaluated as written; the message says what would work."""


@dataclass(frozen=True)
class Ref:
    """A run of the bench: a variant name (or ``"full"``) at a bench rank (``None``: ``--rank``)."""

    run: str
    rank: int | None = None

    def label(self) -> str:
        return self.run if self.rank is None else f"{self.run}@r{self.rank}"


@dataclass(frozen=True)
class Compare:
    """``metric(a) − ratio·metric(b)`` against ``∓slack``, per seed (see the module docstring)."""

    metric: str
    a: Ref
    relation: Literal[">", "<"]
    b: Ref
    ratio: float = 1.0
    slack: float = 0.0

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ClaimError(f"unknown metric {self.metric!r}; use one of {', '.join(METRICS)}")
        if self.relation not in (">", "<"):
            raise ClaimError(f"relation must be '>' or '<', got {self.relation!r}")

    def text(self) -> str:
        b = self.b.label() if self.ratio == 1 else f"{self.ratio:g}×{self.b.label()}"
        if self.slack:
            b += f" {'−' if self.relation == '>' else '+'} {self.slack:g}"
        return f"{self.metric}: {self.a.label()} {self.relation} {b}"


@dataclass(frozen=True)
class Claim:
    """One qualitative claim of a paper: a statement, its source, and the checks that decide it."""

    statement: str
    paper: str
    checks: tuple[Compare, ...]

    def refs(self) -> list[Ref]:
        return [r for c in self.checks for r in (c.a, c.b)]


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------

# Two-sided 95 % quantiles of Student's t, t_{0.975, df}, for df = 1 … 30; beyond, see t975.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
    """``t_{0.975}`` with ``df`` degrees of freedom (table to 30, then ``1.96 + 2.4/df``, within
    0.002 of the exact quantile from 31 on)."""
    if df < 1:
        raise ClaimError(f"an interval needs at least 2 values (df >= 1), got df={df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and its 95 % Student-t interval (``None`` bounds when ``n == 1``)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def half(self) -> float | None:
        return None if self.high is None else self.high - self.mean

    def text(self, fmt: str = ".3f") -> str:
        if self.half is None:
            return f"{self.mean:{fmt}} (single seed, no interval)"
        return f"{self.mean:{fmt}} ± {self.half:{fmt}}"

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


def interval(values: Sequence[float]) -> Interval:
    """Mean and 95 % interval ``mean ± t_{0.975, n−1} · s / √n`` (``s``: sample deviation)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ClaimError("an interval needs at least one value")
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, None, None, 1)
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    half = t975(n - 1) * (var / n) ** 0.5
    return Interval(mean, mean - half, mean + half, n)


def paired(a: Sequence[float], b: Sequence[float], ratio: float = 1.0) -> Interval:
    """The mean per-seed difference ``a_i − ratio·b_i`` and its 95 % interval."""
    if len(a) != len(b):
        raise ClaimError(f"paired values need one pair per seed, got {len(a)} and {len(b)}")
    return interval([x - ratio * y for x, y in zip(a, b, strict=True)])


# --------------------------------------------------------------------------------------------
# Evaluation on measured runs
# --------------------------------------------------------------------------------------------


def _smooth(curve: Sequence[float]) -> list[float]:
    w = max(1, len(curve) // 10)
    out, acc = [], 0.0
    for i, x in enumerate(curve):
        acc += x
        if i >= w:
            acc -= curve[i - w]
        out.append(acc / min(i + 1, w))
    return out


def steps_to(curve: Sequence[float], level: float) -> int:
    """The first step (1-based) whose trailing-mean training loss is ``<= level``, else
    ``len(curve) + 1``."""
    for i, x in enumerate(_smooth(curve)):
        if x <= level:
            return i + 1
    return len(curve) + 1


def final_loss(curve: Sequence[float]) -> float:
    w = max(1, len(curve) // 10)
    return sum(curve[-w:]) / w


def early_loss(curve: Sequence[float]) -> float:
    q = max(1, len(curve) // 4)
    return sum(curve[:q]) / q


def _values(
    check: Compare, runs: Mapping[tuple[str, int | None], Mapping[int, Mapping[str, Any]]]
) -> tuple[list[int], list[float], list[float]]:
    a_runs, b_runs = runs.get((check.a.run, check.a.rank)), runs.get((check.b.run, check.b.rank))
    missing = [r.label() for r, x in ((check.a, a_runs), (check.b, b_runs)) if not x]
    if missing:
        raise ClaimError(f"{check.text()}: no measured run for {', '.join(missing)}")
    assert a_runs is not None and b_runs is not None
    seeds = sorted(set(a_runs) & set(b_runs))
    av, bv = [], []
    for s in seeds:
        ra, rb = a_runs[s], b_runs[s]
        if check.metric == "steps_to_loss":
            level = final_loss(rb["curve"])
            av.append(float(steps_to(ra["curve"], level)))
            bv.append(float(steps_to(rb["curve"], level)))
        elif check.metric in ("early_loss", "final_loss") and check.metric not in ra:
            fn = early_loss if check.metric == "early_loss" else final_loss
            av.append(fn(ra["curve"]))
            bv.append(fn(rb["curve"]))
        else:
            av.append(float(ra[check.metric]))
            bv.append(float(rb[check.metric]))
    return seeds, av, bv


def evaluate_check(
    check: Compare, runs: Mapping[tuple[str, int | None], Mapping[int, Mapping[str, Any]]]
) -> dict[str, Any]:
    """One check on ``runs[(run, rank)][seed] -> figures``: verdict, per-seed values, interval."""
    seeds, av, bv = _values(check, runs)
    if not seeds:
        raise ClaimError(f"{check.text()}: the two runs share no seed")
    diff = paired(av, bv, check.ratio)
    # Shift so that the claimed side is always "> 0".
    sign = 1.0 if check.relation == ">" else -1.0
    lo = None if diff.low is None else sign * (diff.low if sign > 0 else diff.high) + check.slack
    hi = None if diff.high is None else sign * (diff.high if sign > 0 else diff.low) + check.slack
    if lo is None or hi is None:
        verdict = INCONCLUSIVE
    elif lo > 0:
        verdict = HOLDS
    elif hi < 0:
        verdict = FAILS
    else:
        verdict = INCONCLUSIVE
    return {
        "check": check.text(),
        "metric": check.metric,
        "seeds": seeds,
        "a": av,
        "b": bv,
        "difference": diff.to_dict(),
        "verdict": verdict,
    }


def evaluate(
    claim: Claim, runs: Mapping[tuple[str, int | None], Mapping[int, Mapping[str, Any]]]
) -> dict[str, Any]:
    """Every check of ``claim``; the claim fails if any check fails, holds if all hold."""
    results = [evaluate_check(c, runs) for c in claim.checks]
    verdicts = {r["verdict"] for r in results}
    verdict = FAILS if FAILS in verdicts else HOLDS if verdicts == {HOLDS} else INCONCLUSIVE
    return {"statement": claim.statement, "paper": claim.paper, "verdict": verdict, "checks": results}
