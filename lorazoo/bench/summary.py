"""From runs to evidence: means and 95 % intervals over seeds, paired comparisons, claim verdicts.

Runs are grouped by configuration (run name and rank); each figure of a configuration is
reported as the mean over its seeds and a Student-t 95 % interval (:func:`lorazoo.claims.interval`).
Comparisons between two configurations are paired by seed: the mean of the per-seed
differences and its interval (:func:`lorazoo.claims.paired`), which removes what the seed does
to both (the batch order is the same for both runs of one seed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..claims import Claim, ClaimError, evaluate, interval, paired

FIGURES = (
    "learned_bpb",
    "forgot_bpb",
    "target_bpb",
    "source_bpb",
    "tokens_per_s",
    "train_seconds",
    "run_seconds",
)
REFERENCE = "lora"  # paired comparisons and relative speed are against LoRA at the same rank


def group(runs: Sequence[dict[str, Any]]) -> dict[tuple[str, int | None], dict[int, dict[str, Any]]]:
    """``{(name, rank): {seed: run}}`` for every trained run (the base is left out)."""
    out: dict[tuple[str, int | None], dict[int, dict[str, Any]]] = {}
    for row in runs:
        if row.get("seed") is None:
            continue
        out.setdefault((row["name"], row["rank"]), {})[row["seed"]] = row
    return out


def _config_row(key: tuple[str, int | None], by_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    seeds = sorted(by_seed)
    rows = [by_seed[s] for s in seeds]
    first = rows[0]
    out: dict[str, Any] = {
        "name": key[0],
        "rank": key[1],
        "label": first["label"],
        "kind": first["kind"],
        "seeds": seeds,
        "lr": first["lr"],
        "r": (first.get("config") or {}).get("r"),
        "trainable": first["trainable"],
        "file_bytes": first.get("file_bytes"),
    }
    for f in FIGURES:
        out[f] = interval([r[f] for r in rows]).to_dict()
    mems = [r["peak_memory_bytes"] for r in rows if r.get("peak_memory_bytes") is not None]
    out["peak_memory_bytes"] = max(mems) if mems else None
    if "merge_max_abs_diff" in first:
        out["merge_max_abs_diff"] = max(r["merge_max_abs_diff"] for r in rows)
        out["unmerge_exact"] = all(r["unmerge_exact"] for r in rows)
    lat = [r for r in rows if "latency_ratio" in r]
    if lat:
        out["latency_ratio"] = lat[0]["latency_ratio"]
    return out


def _paired(
    a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], field: str, ratio: bool = False
) -> dict[str, Any] | None:
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    if ratio:  # the per-seed ratio a/b, then its mean and interval
        return interval([a[s][field] / b[s][field] for s in seeds]).to_dict()
    if field == "cpu_speed":  # throughput per CPU second: b's training CPU time over a's
        if any("train_cpu_seconds" not in x[s] for x in (a, b) for s in seeds):
            return None  # results without CPU times (written by hand or by another tool)
        return interval([b[s]["train_cpu_seconds"] / a[s]["train_cpu_seconds"] for s in seeds]).to_dict()
    return paired([a[s][field] for s in seeds], [b[s][field] for s in seeds]).to_dict()


def summarize(result: dict[str, Any], claims: Sequence[tuple[str, Claim]]) -> dict[str, Any]:
    """Per-configuration intervals, paired comparisons against LoRA, the rank sweep and the
    verdict of each claim, as plain data (stored in ``results.json``)."""
    groups = group(result["runs"])
    main_rank = result["recipe"]["rank"]
    configs = []
    for key, by_seed in groups.items():
        row = _config_row(key, by_seed)
        ref = groups.get((REFERENCE, key[1] if key[1] is not None else main_rank))
        if ref is not None and key[0] != "full":
            # Training CPU time, not wall time: on a shared machine the wall time of a one-thread
            # run mostly measures the other tenants; its CPU time is what it costs.
            row["speed_vs_lora"] = _paired(by_seed, ref, "cpu_speed")
            row["wall_speed_vs_lora"] = _paired(by_seed, ref, "tokens_per_s", ratio=True)
            if key[0] != REFERENCE:
                row["learned_vs_lora"] = _paired(by_seed, ref, "learned_bpb")
                row["forgot_vs_lora"] = _paired(by_seed, ref, "forgot_bpb")
        configs.append(row)

    sweep: dict[str, list[dict[str, Any]]] = {}
    for (name, rank), by_seed in groups.items():
        if rank is not None:
            sweep.setdefault(name, []).append(
                {
                    "rank": rank,
                    "learned_bpb": interval([r["learned_bpb"] for r in by_seed.values()]).to_dict(),
                }
            )
    sweep = {k: sorted(v, key=lambda x: x["rank"]) for k, v in sweep.items() if len(v) > 1}

    lookup = dict(groups)
    for (name, rank), by_seed in groups.items():
        if rank == main_rank:
            lookup[(name, None)] = by_seed
    verdicts = []
    for variant, claim in claims:
        try:
            res = evaluate(claim, lookup)
        except ClaimError as exc:
            res = {
                "statement": claim.statement,
                "paper": claim.paper,
                "verdict": "not run",
                "note": f"{exc} (lorazoo bench --claims adds the runs it needs)",
                "checks": [],
            }
        verdicts.append({"variant": variant, **res})
    return {"configs": configs, "rank_sweep": sweep, "claims": verdicts, "reference": REFERENCE}
