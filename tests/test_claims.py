"""Claims as data: the interval and paired-difference arithmetic, the verdict rule, and claims
evaluated on a synthetic results file (one that holds, one that fails, one inconclusive)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lorazoo
from lorazoo.bench.summary import summarize
from lorazoo.claims import (
    METRICS,
    Claim,
    ClaimError,
    Compare,
    Ref,
    evaluate,
    interval,
    paired,
    steps_to,
    t975,
)


def test_interval_matches_a_hand_computed_t_interval():
    # mean 2.5; s = sqrt(((1.5² + 0.5²)·2) / 3) = sqrt(5/3) = 1.2909944;
    # half = t_{0.975,3} · s / sqrt(4) = 3.182 · 1.2909944 / 2 = 2.0539721
    iv = interval([1.0, 2.0, 3.0, 4.0])
    assert iv.mean == 2.5 and iv.n == 4
    assert iv.half == pytest.approx(2.0539721, abs=1e-6)
    assert (iv.low, iv.high) == (pytest.approx(0.4460279, abs=1e-6), pytest.approx(4.5539721, abs=1e-6))
    assert iv.text() == "2.500 ± 2.054"


def test_paired_difference_matches_hand_computed_values():
    # Per-seed differences +0.009, +0.006, +0.006: mean 0.007, s = sqrt(3e-6), half = 4.303 · s / sqrt(3)
    dora = [0.353, 0.292, 0.277]
    lora = [0.344, 0.286, 0.271]
    d = paired(dora, lora)
    assert d.mean == pytest.approx(0.007, abs=1e-12)
    assert d.half == pytest.approx(0.004303, abs=1e-9)
    assert d.low == pytest.approx(0.002697, abs=1e-9) and d.high == pytest.approx(0.011303, abs=1e-9)
    # LoRA alone: mean 0.300333, squared deviations sum to 0.0029727, s² = 0.0014863;
    # half = 4.303 · sqrt(0.0014863 / 3) = 0.09578, twenty times the paired half-width.
    assert interval(lora).half == pytest.approx(0.09578, abs=1e-5)
    # With a ratio: a − 0.5·b per seed = 2, 3, 4 → mean 3, s = 1, half = 4.303 / sqrt(3)
    r = paired([4.0, 6.0, 8.0], [4.0, 6.0, 8.0], ratio=0.5)
    assert r.mean == 3.0 and r.half == pytest.approx(4.303 / math.sqrt(3))


def test_one_seed_gives_no_interval():
    iv = interval([0.3])
    assert iv.low is None and iv.high is None and iv.half is None
    assert iv.text() == "0.300 (single seed, no interval)"


def test_t_quantiles():
    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(30) == 2.042
    assert t975(60) == pytest.approx(2.000, abs=0.002) and t975(120) == pytest.approx(1.980, abs=0.002)
    with pytest.raises(ClaimError):
        t975(0)


@given(
    st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=12),
    st.floats(-50, 50, allow_nan=False),
)
def test_paired_difference_ignores_what_both_runs_share(xs, shift):
    ys = [x * 0.5 + 1.0 for x in xs]
    base = paired(xs, ys)
    shifted = paired([x + shift for x in xs], [y + shift for y in ys])
    assert shifted.mean == pytest.approx(base.mean, abs=1e-9)
    assert shifted.half == pytest.approx(base.half, abs=1e-9)
    assert base.low <= base.mean <= base.high
    same = paired(xs, xs)
    assert same.mean == 0 and same.half == 0


def test_steps_to_loss_uses_a_trailing_mean():
    curve = [10.0 - i for i in range(10)]  # window 1 for 10 steps: the raw curve
    assert steps_to(curve, 5.0) == 6 and steps_to(curve, 0.5) == 11
    long = [4.0] * 10 + [1.0] * 10  # window 2: step 11 averages 4 and 1
    assert steps_to(long, 2.5) == 11 and steps_to(long, 1.0) == 12


def test_a_compare_rejects_an_unknown_metric_or_relation():
    with pytest.raises(ClaimError, match="unknown metric"):
        Compare("accuracy", Ref("dora"), ">", Ref("lora"))
    with pytest.raises(ClaimError, match="relation"):
        Compare("learned_bpb", Ref("dora"), ">=", Ref("lora"))  # type: ignore[arg-type]


def _row(
    name: str, seed: int, learned: float, forgot: float, curve: list[float], rank: int | None = 8
) -> dict:
    return {
        "name": name,
        "label": name,
        "kind": "baseline" if name == "full" else "variant",
        "variant": None if name == "full" else name,
        "rank": None if name == "full" else rank,
        "seed": seed,
        "lr": 1e-3,
        "config": None if name == "full" else {"r": rank},
        "trainable": 100 if name == "full" else 10,
        "file_bytes": 1000,
        "target_bpb": 3.0 - learned,
        "source_bpb": 2.0 + forgot,
        "learned_bpb": learned,
        "forgot_bpb": forgot,
        "tokens_per_s": 1000.0 + seed,
        "train_seconds": 1.0,
        "run_seconds": 1.5,
        "peak_memory_bytes": 1 << 20,
        "curve": curve,
    }


@pytest.fixture
def results_file(tmp_path):
    """A synthetic results.json: three seeds of lora, dora, olora and full fine-tuning."""
    runs = [{"name": "base", "seed": None, "rank": None, "target_bpb": 3.0, "source_bpb": 2.0}]
    for s, (lora, dora, full) in enumerate([(0.34, 0.36, 0.50), (0.29, 0.31, 0.49), (0.27, 0.29, 0.51)]):
        curve = [3.0 - 0.01 * i for i in range(40)]
        runs.append(_row("lora", s, lora, 0.16, curve))
        runs.append(_row("dora", s, dora, 0.17, curve))
        runs.append(_row("full", s, full, 0.23, curve))
        # olora's early loss is above lora's for seed 0 and below for seeds 1 and 2: no clear sign
        early = [0.3, -0.2, -0.05][s]
        runs.append(_row("olora", s, lora, 0.16, [x + early if i < 10 else x for i, x in enumerate(curve)]))
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"recipe": {"rank": 8}, "runs": runs}))
    return path


CLAIMS = [
    (
        "lora",
        Claim(
            "learns less and forgets less than full fine-tuning",
            "Hu et al.",
            (
                Compare("learned_bpb", Ref("lora"), "<", Ref("full")),
                Compare("forgot_bpb", Ref("lora"), "<", Ref("full")),
            ),
        ),
    ),
    (
        "dora",
        Claim(
            "learns less than LoRA",
            "a made-up paper",
            (Compare("learned_bpb", Ref("dora"), "<", Ref("lora")),),
        ),
    ),
    (
        "olora",
        Claim("lower early loss", "Büyükakyüz", (Compare("early_loss", Ref("olora"), "<", Ref("lora")),)),
    ),
    ("dora", Claim("at rank 64", "x", (Compare("learned_bpb", Ref("dora", 64), ">", Ref("lora", 64)),))),
]


def test_claims_on_a_results_file_hold_fail_or_stay_inconclusive(results_file):
    doc = json.loads(results_file.read_text())
    out = summarize(doc, CLAIMS)["claims"]
    verdicts = [c["verdict"] for c in out]
    assert verdicts == ["holds", "fails", "inconclusive", "not run"]
    holds, fails, inconclusive, missing = out
    learned = holds["checks"][0]
    assert learned["a"] == [0.34, 0.29, 0.27] and learned["b"] == [0.50, 0.49, 0.51]
    # per-seed −0.16, −0.20, −0.24: mean −0.20, s = 0.04, half = 4.303 · 0.04 / sqrt(3)
    assert learned["difference"]["mean"] == pytest.approx(-0.20)
    assert learned["difference"]["high"] == pytest.approx(-0.20 + 4.303 * 0.04 / math.sqrt(3))
    assert fails["checks"][0]["difference"]["low"] > 0  # dora − lora = +0.02 every seed
    d = inconclusive["checks"][0]["difference"]
    assert d["low"] < 0 < d["high"]
    assert "no measured run for dora@r64, lora@r64" in missing["note"] and "--claims" in missing["note"]


def test_a_check_with_one_seed_is_inconclusive():
    runs = {("lora", 8): {0: {"learned_bpb": 0.3}}, ("full", None): {0: {"learned_bpb": 0.5}}}
    res = evaluate(Claim("s", "p", (Compare("learned_bpb", Ref("lora", 8), "<", Ref("full")),)), runs)
    assert res["verdict"] == "inconclusive"
    assert res["checks"][0]["difference"]["low"] is None


def test_slack_and_ratio_move_the_line():
    runs = {
        ("vera", 8): {s: {"learned_bpb": v} for s, v in enumerate([0.27, 0.28, 0.26])},
        ("lora", 8): {s: {"learned_bpb": v} for s, v in enumerate([0.30, 0.31, 0.29])},
    }
    at_least = Compare("learned_bpb", Ref("vera", 8), ">", Ref("lora", 8), ratio=0.8)
    assert evaluate(Claim("s", "p", (at_least,)), runs)["verdict"] == "holds"  # 0.03 above 0.8×
    strict = Compare("learned_bpb", Ref("vera", 8), ">", Ref("lora", 8))
    assert evaluate(Claim("s", "p", (strict,)), runs)["verdict"] == "fails"  # 0.03 below, every seed
    slack = Compare("learned_bpb", Ref("vera", 8), ">", Ref("lora", 8), slack=0.05)
    assert evaluate(Claim("s", "p", (slack,)), runs)["verdict"] == "holds"


def test_every_built_in_variant_declares_checkable_claims():
    for name in ("lora", "rslora", "loraplus", "dora", "vera", "olora"):
        cls = lorazoo.variant(name)
        assert cls.claims, name
        for claim in cls.claims:
            assert claim.statement and claim.paper and claim.checks
            for check in claim.checks:
                assert check.metric in METRICS
                for ref in (check.a, check.b):
                    assert ref.run == "full" or ref.run in lorazoo.variants()


def test_bench_kwargs_default_and_scaled_rank():
    assert lorazoo.variant("lora").bench_kwargs(16) == {"r": 16}
    assert lorazoo.variant("vera").bench_kwargs(8) == {"r": 256}
    assert lorazoo.variant("vera").bench_kwargs(4) == {"r": 128}
