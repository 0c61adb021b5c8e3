"""``lorazoo bench --quick`` end to end: two seeds with intervals and claim verdicts, figures
finite and sane, files agreeing with stdout, the pre-trained base cached, reused and the same
bits on any thread count, figures reproduced exactly, and bad options failing before any work."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import lorazoo
from lorazoo.bench import cache, data, runner
from lorazoo.bench.measure import Progress
from lorazoo.bench.model import LlamaLike
from lorazoo.bench.plan import QUICK, Options, comparable_hyper, make_plan
from lorazoo.bench.runner import load_setup, torch_threads
from lorazoo.claims import interval, paired
from lorazoo.cli import main, parse_lr, parse_ranks, parse_seeds

# An end-to-end sanity bound on max |merged − unmerged| logits, relative to the largest logit:
# about 1700 fp32 units of rounding through a 2-layer model. The per-layer tolerance model of
# docs/spec/variants.md §11 is checked exactly by the conformance suite; here only gross errors (a merge
# that drops or doubles an update, which moves logits by ~1e-1 relative) must be caught.
MERGE_REL_BOUND = 1e-4


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    out: Path
    doc: dict


def _bench(tmp: Path, cache_dir: Path, name: str, *extra: str) -> Run:
    out = tmp / name
    rc, stdout, err = run_cli(
        "bench", "--quick", "--no-progress", "--cache-dir", str(cache_dir), "--out", str(out), *extra
    )
    assert rc == 0, err
    return Run(rc, stdout, err, out, json.loads((out / "results.json").read_text()))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Run, Path]:
    """``--quick --claims`` (two seeds, every variant, the claims' extra runs), then a second
    run of two variants that reuses the cached base."""
    tmp = tmp_path_factory.mktemp("bench")
    cache_dir = tmp / "cache"
    first = _bench(tmp, cache_dir, "first", "--claims")
    second = _bench(tmp, cache_dir, "second", "--variants", "lora,vera")
    return first, second, cache_dir


def by_name(doc: dict, seed: int | None = 0) -> dict[str, dict]:
    """The runs of one seed (and the base), by label."""
    return {r["label"]: r for r in doc["runs"] if r["seed"] in (None, seed)}


def configs(doc: dict) -> dict[str, dict]:
    return {c["label"]: c for c in doc["summary"]["configs"]}


def test_every_registered_variant_runs_beside_both_baselines_for_each_seed(runs):
    first, _, _ = runs
    assert first.doc["seeds"] == [0, 1] == list(QUICK.seeds)
    for seed in (0, 1):
        labels = [r["label"] for r in first.doc["runs"] if r["seed"] == seed]
        main = labels[: len(lorazoo.variants()) + 1]
        assert main == [*lorazoo.variants(), "full"]
        # the rsLoRA claim needs LoRA and rsLoRA at rank 64
        assert sorted(labels[len(main) :]) == ["lora@r64", "rslora@r64"]
    assert [r["label"] for r in first.doc["runs"]].count("base") == 1  # one base for every seed


def test_figures_are_finite_and_every_run_learns_the_target(runs):
    first, _, _ = runs
    base = by_name(first.doc)["base"]
    for row in first.doc["runs"]:
        for key in ("target_bpb", "source_bpb"):
            assert math.isfinite(row[key]) and 0 < row[key] < 8, (row["label"], key, row[key])
        if row["name"] == "base":
            continue
        assert row["target_bpb"] < base["target_bpb"], row["label"]
        assert row["learned_bpb"] == pytest.approx(base["target_bpb"] - row["target_bpb"])
        assert row["forgot_bpb"] == pytest.approx(row["source_bpb"] - base["source_bpb"])
        assert row["tokens_per_s"] > 0 and row["train_cpu_seconds"] > 0
        assert row["run_seconds"] >= row["train_seconds"] > 0
        assert (
            all(math.isfinite(x) for x in row["curve"]) and len(row["curve"]) == first.doc["recipe"]["steps"]
        )
        assert row["early_loss"] == pytest.approx(sum(row["curve"][:5]) / 5)  # first quarter of 20


def test_seeds_change_the_adaptation_not_the_base(runs):
    first, _, _ = runs
    a, b = by_name(first.doc, 0), by_name(first.doc, 1)
    for label in ("lora", "full"):
        assert a[label]["curve"] != b[label]["curve"]  # another batch order
    assert a["lora"]["curve"][0] != b["lora"]["curve"][0]
    assert first.doc["base"]["cache_recipe"]["seed"] == QUICK.base_seed
    assert "seeds" not in first.doc["base"]["cache_recipe"]


def test_summary_is_the_mean_and_t_interval_of_the_seeds(runs):
    first, _, _ = runs
    cfg = configs(first.doc)
    for label in ("lora", "dora", "full", "rslora@r64"):
        values = [r["learned_bpb"] for r in first.doc["runs"] if r["label"] == label]
        assert len(values) == 2
        iv = cfg[label]["learned_bpb"]
        assert iv == interval(values).to_dict()
        # by hand for two values: half = t_{0.975,1} · |x1 − x2| / 2
        assert iv["high"] - iv["mean"] == pytest.approx(12.706 * abs(values[0] - values[1]) / 2)
    dora = [r["learned_bpb"] for r in first.doc["runs"] if r["label"] == "dora"]
    lora = [r["learned_bpb"] for r in first.doc["runs"] if r["label"] == "lora"]
    assert cfg["dora"]["learned_vs_lora"] == paired(dora, lora).to_dict()


def test_claims_of_every_built_in_variant_get_a_verdict_with_an_interval(runs):
    first, _, _ = runs
    claims = first.doc["summary"]["claims"]
    assert sorted({c["variant"] for c in claims}) == sorted(lorazoo.variants())
    for c in claims:
        assert c["verdict"] in ("holds", "fails", "inconclusive"), c
        for check in c["checks"]:
            assert check["seeds"] == [0, 1]
            d = check["difference"]
            assert d["low"] is not None and d["low"] <= d["mean"] <= d["high"]
    assert "Claims:" in first.stdout
    for c in claims:
        assert c["statement"] in first.stdout and c["verdict"].upper() in first.stdout
    # VeRA trains 3,136 parameters at quick rank 4 against LoRA's 9,856: not ten times fewer, every seed
    vera = next(c for c in claims if c["variant"] == "vera")
    assert vera["checks"][0]["verdict"] == "fails" and vera["verdict"] == "fails"


def test_rank_sweep_from_the_claims(runs):
    first, _, _ = runs
    sweep = first.doc["summary"]["rank_sweep"]
    assert sorted(sweep) == ["lora", "rslora"]
    for pts in sweep.values():
        assert [p["rank"] for p in pts] == [QUICK.rank, 64]
    assert "Rank sweep:" in first.stdout and "r=64" in first.stdout


def test_merged_output_matches_unmerged_and_unmerge_is_exact(runs):
    first, _, _ = runs
    for row in first.doc["runs"]:
        if row["kind"] != "variant":
            continue
        assert 0 <= row["merge_max_abs_diff"] <= MERGE_REL_BOUND * row["logits_max_abs"], row["label"]
        assert row["logits_max_abs"] > 0.1
        assert row["unmerge_exact"] is True
        if row["seed"] == 0 and row["rank"] == QUICK.rank:
            assert math.isfinite(row["latency_ratio"]) and row["latency_ratio"] > 0
        else:
            assert "latency_ratio" not in row  # timed once per variant


def test_trainable_counts_and_files_match_the_public_api(runs):
    first, _, _ = runs
    targets = first.doc["recipe"]["targets"]
    for label, row in by_name(first.doc).items():
        model = LlamaLike(QUICK.model)
        if row["name"] == "full":
            assert row["trainable"] == lorazoo.trainable(model).total
            continue
        if row["name"] == "base":
            assert row["trainable"] == 0
            continue
        lorazoo.inject(model, row["variant"], targets, **row["config"])
        assert row["trainable_at_start"] == lorazoo.trainable(model).trainable
        if "ranks" in row:  # a budget that shrinks while training (AdaLoRA): the last mask's
            assert sum(row["ranks"].values()) == row["rank_history"][-1]["budget"]
            assert row["trainable"] < row["trainable_at_start"]
        else:
            assert row["trainable"] == row["trainable_at_start"]
        if "@" in label:
            continue  # only the main rank's adapters are kept
        path = first.out / "adapters" / f"{row['name']}.safetensors"
        assert path.stat().st_size == row["file_bytes"]
        fresh = LlamaLike(QUICK.model)
        lorazoo.load(fresh, path)
        assert lorazoo.adapter_names(fresh) == {"default": row["variant"]}
        assert lorazoo.trainable(fresh).trainable == row["trainable"]


def test_files_agree_with_stdout(runs):
    first, _, _ = runs
    table = first.doc["outputs"]["table"]
    assert table in first.stdout
    report = (first.out / "report.md").read_text()
    assert table in report
    for label, c in configs(first.doc).items():
        if "@" not in label:
            assert f"{c['learned_bpb']['mean']:+.3f}".replace("-", "−") in table
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert len(lines) == 1 + 1 + len(lorazoo.variants()) + 1  # header, base, variants, full
    assert "95 % Student-t interval over 2 seeds" in first.stdout
    d = first.doc["data"]
    for dom in ("source", "target"):
        assert d[dom]["train_bytes"] > 10_000 and d[dom]["eval_bytes"] > 1_000
        assert f"{d[dom]['train_bytes']:,} B" in first.stdout
    v = first.doc["versions"]
    assert v["torch"] == torch.__version__ and v["lorazoo"] == lorazoo.__version__
    assert v["torch_threads"] == first.doc["threads"] == 1 and v["device"] == "cpu"
    assert (first.out / "figure.png").exists() == (first.doc["outputs"]["figure"] is not None)


def test_output_folder_has_normal_permissions(runs):
    first, _, _ = runs
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(first.out.stat().st_mode) == 0o777 & ~umask


def test_second_run_reuses_the_cached_base_and_reproduces_the_figures(runs):
    first, second, cache_dir = runs
    assert first.doc["base"]["pretrained"] is True and first.doc["base"]["from_cache"] is False
    assert second.doc["base"]["pretrained"] is False and second.doc["base"]["from_cache"] is True
    assert second.doc["base"]["cache_key"] == first.doc["base"]["cache_key"]
    assert Path(second.doc["base"]["cache_file"]).parent.parent == cache_dir
    assert second.doc["timing"]["pretrain_seconds"] == 0.0
    assert "reused from the cache" in second.stdout
    assert not [p for p in cache_dir.rglob("*") if p.name.endswith(".tmp")]
    # Same seed, thread count and torch version: the same figures to the last bit.
    for seed in (0, 1):
        a, b = by_name(first.doc, seed), by_name(second.doc, seed)
        for label in ("base", "lora", "vera", "full"):
            for key in ("target_bpb", "source_bpb", "curve", "trainable"):
                if key in a[label]:
                    assert a[label][key] == b[label][key], (seed, label, key)


def test_base_is_the_same_bits_whatever_the_thread_count(tmp_path):
    states = []
    for threads in (1, 2):
        plan = make_plan(Options(quick=True, threads=threads, progress=False, cache_dir=str(tmp_path)))
        setup = load_setup(plan)
        with torch_threads(threads):
            runner.pretrain(setup)
        states.append(setup.backend.base_state)
        key = runner.base_key(setup)
        assert key["threads"] == 1 and key["torch"] == torch.__version__
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_the_base_key_does_not_depend_on_the_adaptation_seeds():
    keys = []
    for seeds in ([0], [5, 6]):
        setup = load_setup(make_plan(Options(quick=True, seeds=seeds, progress=False)))
        keys.append(runner.base_key(setup))
    assert keys[0] == keys[1]


def test_claims_make_the_plan_add_the_runs_they_read():
    def labels(**kw: object) -> list[str]:
        return [s.label for s in make_plan(Options(quick=True, **kw)).specs]  # type: ignore[arg-type]

    assert labels(variants=["dora"]) == ["dora", "full"]
    assert labels(variants=["dora"], claims=True) == ["dora", "full", "lora"]
    assert labels(variants=["rslora"], claims=True) == ["rslora", "full", "rslora@r64", "lora@r64", "lora"]
    assert labels(variants=["lora", "vera"], ranks=[2, 8]) == [
        "lora", "vera", "lora@r2", "vera@r2", "lora@r8", "vera@r8", "full"
    ]  # fmt: skip
    plan = make_plan(Options(quick=True, variants=["vera"], ranks=[8]))
    assert [s.hyper["r"] for s in plan.specs if s.hyper] == [128, 256]  # VeRA: 32 × rank


def test_module_entry_point_runs_one_variant(runs, tmp_path):
    _, _, cache_dir = runs
    out = tmp_path / "cli"
    args = ["bench", "--quick", "--variants", "lora", "--seeds", "1", "--lr", "full=2e-3"]
    proc = subprocess.run(
        [
            sys.executable,
            "-W",
            "ignore",
            "-m",
            "lorazoo",
            *args,
            "--cache-dir",
            str(cache_dir),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in doc["runs"]] == ["base", "lora", "full"]
    assert doc["base"]["from_cache"] is True
    assert by_name(doc)["full"]["lr"] == 2e-3
    assert "(1 seed)" in proc.stdout and "single seed, no interval" in proc.stdout
    assert "| lora " in proc.stdout and "training lora" in proc.stderr  # table on stdout, progress on stderr


class _Plugin:
    """A third-party variant the bench has never heard of, with its own default rank."""

    from dataclasses import dataclass as _dc

    @_dc(frozen=True)
    class WideConfig(lorazoo.VariantConfig):
        r: int = 16
        alpha: float = 32.0

    class Wide(lorazoo.LowRankAdapter):
        name = "widelora"
        recommended_lr = 2e-3

    Wide.config_class = WideConfig

    @staticmethod
    @lorazoo.hookimpl
    def lorazoo_variants():
        return [_Plugin.Wide]


def test_a_third_party_variant_gets_its_comparable_rank_and_lr(runs, tmp_path):
    _, _, cache_dir = runs
    plugin = _Plugin()
    lorazoo.register(plugin, name="widelora-test")
    try:
        run = _bench(tmp_path, cache_dir, "wide", "--variants", "widelora", "--seeds", "1")
    finally:
        lorazoo.unregister(plugin)
    row = by_name(run.doc)["widelora"]
    # its own default rank scaled by rank / 8; alpha at its own default (the scale alpha / r changes)
    assert row["config"] == {"r": 16 * QUICK.rank // 8}
    assert row["lr"] == pytest.approx(2e-3 * QUICK.lr_scale)
    assert row["target_bpb"] < by_name(run.doc)["base"]["target_bpb"]


def test_rank_rule_keeps_each_variants_default_rank_at_rank_8():
    for name in lorazoo.variants():
        cls = lorazoo.variant(name)
        hyper = comparable_hyper(cls, 8)
        default = cls.config_class()
        config = cls.config_class.from_kwargs(**hyper)  # a valid config for that variant
        assert config.r == default.r and config.alpha == pytest.approx(default.alpha)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variants", "nosuch"], "registered variants: "),
        (["--variants", "lroa"], "(did you mean 'lora'?)"),
        (["--seeds", "x"], "write a count"),
        (["--seeds", "0"], "at least one seed"),
        (["--ranks", "4,0"], "positive"),
        (["--variants", "lora,lora"], "more than once"),
        (["--lr", "nosuch=1e-3"], "not among the runs"),
        (["--lr", "lora=fast"], "is not a number"),
        (["--lr", "-1"], "positive"),
        (["--steps", "0"], "positive integer"),
        (["--rank", "x"], "not an integer"),
        (["--rank", "1000"], "cannot be set up"),
        (["--targets", "nosuch_proj"], "cannot be set up"),
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--frobnicate"], "unrecognized arguments"),
    ],
)
def test_bad_options_fail_clearly_before_any_work(tmp_path, args, message):
    out, cache_dir = tmp_path / "out", tmp_path / "cache"
    rc, stdout, err = run_cli("bench", "--quick", "--cache-dir", str(cache_dir), "--out", str(out), *args)
    assert rc == 2
    assert message in err and "error" in err
    assert stdout == ""
    assert not out.exists() and not cache_dir.exists()


def test_model_option_needs_a_model_directory_and_transformers(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    rc, _, err = run_cli("bench", "--model", str(tmp_path / "weights.bin"), "--out", str(tmp_path / "o"))
    assert rc == 2 and "not a directory" in err
    rc, _, err = run_cli("bench", "--model", str(tmp_path), "--out", str(tmp_path / "o"))
    assert rc == 2 and "no config.json" in err
    try:
        import transformers  # noqa: F401
    except ImportError:
        (tmp_path / "config.json").write_text("{}")
        rc, _, err = run_cli("bench", "--model", str(tmp_path), "--out", str(tmp_path / "o"))
        assert rc == 2 and "transformers" in err and "pip install" in err
    assert not (tmp_path / "o").exists()


def test_existing_output_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = run_cli("bench", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "c"))
    assert rc == 2 and "already exists" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_help_describes_the_commands():
    rc, stdout, _ = run_cli("--help")
    assert rc == 0 and "bench" in stdout
    rc, stdout, _ = run_cli("bench", "--help")
    assert rc == 0
    for option in (
        "--variants",
        "--steps",
        "--rank",
        "--targets",
        "--seeds",
        "--ranks",
        "--claims",
        "--out",
        "--quick",
        "--lr",
        "--model",
    ):
        assert option in stdout


def test_lr_option_syntax():
    assert parse_lr("2e-3") == {"*": 2e-3}
    assert parse_lr("vera=1e-2,full=1e-4") == {"vera": 1e-2, "full": 1e-4}


def test_seeds_and_ranks_option_syntax():
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("0,5") == [0, 5]
    assert parse_seeds("4,") == [4]
    assert parse_ranks("4,16,64") == [4, 16, 64]


def test_splits_are_fixed_seeded_and_disjoint():
    a_src, a_tgt = data.load_domains(0, 4096, 4096, 65536, 65536)
    b_src, b_tgt = data.load_domains(0, 4096, 4096, 65536, 65536)
    c_src, _ = data.load_domains(1, 4096, 4096, 65536, 65536)
    assert a_src.sha256() == b_src.sha256() and a_tgt.sha256() == b_tgt.sha256()
    assert a_src.sha256() != c_src.sha256()
    for dom in (a_src, a_tgt):
        d = dom.describe()
        assert d["train_bytes"] == len(dom.train.data) and d["eval_bytes"] == len(dom.eval.data)
        assert dom.eval.names and dom.train.names and not set(dom.eval.names) & set(dom.train.names)
        assert d["eval_names"] == list(dom.eval.names)


def test_cache_location_and_unreadable_files(tmp_path, monkeypatch):
    monkeypatch.delenv(cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "lorazoo"
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "mine"))
    assert cache.cache_dir() == tmp_path / "mine"
    assert cache.cache_dir(tmp_path / "opt") == tmp_path / "opt"
    bad = tmp_path / "base-x.pt"
    bad.write_bytes(b"not a checkpoint")
    assert cache.load_base(bad) is None
    good = tmp_path / "sub" / "base-y.pt"
    cache.save_base(good, {"w": torch.ones(2)}, {"steps": 1})
    blob = cache.load_base(good)
    assert (
        blob is not None
        and torch.equal(blob["state_dict"]["w"], torch.ones(2))
        and blob["meta"] == {"steps": 1}
    )
    assert [p.name for p in good.parent.iterdir()] == ["base-y.pt"]


def test_plain_progress_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    stream = io.StringIO()
    bar = Progress(20, stream=stream)
    bar.describe("training lora")
    for _ in range(20):
        bar.update(1, "loss 1.0")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("lorazoo bench") and "training lora" in lines[0]
    assert "100.0%" in lines[-1] and len(lines) <= 12  # one line per tenth, not one per step
