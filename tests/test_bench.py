"""``lorazoo bench --quick`` end to end: figures are finite and sane, files agree with stdout,
the pre-trained base is cached and reused, and bad options fail cleanly before any work."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import lorazoo
from lorazoo.bench import cache, data
from lorazoo.bench.measure import Progress
from lorazoo.bench.model import LlamaLike
from lorazoo.bench.runner import QUICK, comparable_hyper
from lorazoo.cli import main, parse_lr

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
    out: Path
    doc: dict


def _bench(tmp: Path, cache_dir: Path, name: str, *extra: str) -> Run:
    out = tmp / name
    rc, stdout, err = run_cli(
        "bench", "--quick", "--no-progress", "--cache-dir", str(cache_dir), "--out", str(out), *extra
    )
    assert rc == 0, err
    return Run(rc, stdout, out, json.loads((out / "results.json").read_text()))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Run, Path]:
    tmp = tmp_path_factory.mktemp("bench")
    cache_dir = tmp / "cache"
    first = _bench(tmp, cache_dir, "first")
    second = _bench(tmp, cache_dir, "second")
    return first, second, cache_dir


def by_name(doc: dict) -> dict[str, dict]:
    return {r["name"]: r for r in doc["runs"]}


def test_every_registered_variant_runs_beside_both_baselines(runs):
    first, _, _ = runs
    names = [r["name"] for r in first.doc["runs"]]
    assert names == ["base", *lorazoo.variants(), "full"]


def test_figures_are_finite_and_every_run_learns_the_target(runs):
    first, _, _ = runs
    rows = by_name(first.doc)
    base = rows["base"]
    for row in first.doc["runs"]:
        for key in ("target_bpb", "source_bpb"):
            assert math.isfinite(row[key]) and 0 < row[key] < 8, (row["name"], key, row[key])
        if row["name"] == "base":
            continue
        assert row["target_bpb"] < base["target_bpb"], row["name"]
        assert row["learned_bpb"] == pytest.approx(base["target_bpb"] - row["target_bpb"])
        assert row["forgot_bpb"] == pytest.approx(row["source_bpb"] - base["source_bpb"])
        assert row["tokens_per_s"] > 0 and row["train_cpu_seconds"] > 0
        assert (
            all(math.isfinite(x) for x in row["curve"]) and len(row["curve"]) == first.doc["recipe"]["steps"]
        )
    assert rows["full"]["target_bpb"] < base["target_bpb"]


def test_merged_output_matches_unmerged_and_unmerge_is_exact(runs):
    first, _, _ = runs
    for row in first.doc["runs"]:
        if row["kind"] != "variant":
            continue
        assert 0 <= row["merge_max_abs_diff"] <= MERGE_REL_BOUND * row["logits_max_abs"], row["name"]
        assert row["logits_max_abs"] > 0.1
        assert row["unmerge_exact"] is True
        assert math.isfinite(row["latency_ratio"]) and row["latency_ratio"] > 0


def test_trainable_counts_and_files_match_the_public_api(runs):
    first, _, _ = runs
    targets = first.doc["recipe"]["targets"]
    for row in first.doc["runs"]:
        model = LlamaLike(QUICK.model)
        if row["name"] == "full":
            assert row["trainable"] == lorazoo.trainable(model).total
            continue
        if row["name"] == "base":
            assert row["trainable"] == 0
            continue
        lorazoo.inject(model, row["variant"], targets, **row["config"])
        assert row["trainable"] == lorazoo.trainable(model).trainable
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
    for row in first.doc["runs"]:
        assert f"{row['target_bpb']:.3f}" in table
    lines = [ln for ln in first.stdout.splitlines() if ln.startswith("| ")]
    assert len(lines) == 1 + len(first.doc["runs"])  # header and one line per run
    d = first.doc["data"]
    for dom in ("source", "target"):
        assert d[dom]["train_bytes"] > 10_000 and d[dom]["eval_bytes"] > 1_000
        assert f"{d[dom]['train_bytes']:,} B" in first.stdout
    assert first.doc["versions"]["torch"] == torch.__version__
    assert first.doc["versions"]["lorazoo"] == lorazoo.__version__
    assert (first.out / "figure.png").exists() == (first.doc["outputs"]["figure"] is not None)


def test_second_run_reuses_the_cached_base(runs):
    first, second, cache_dir = runs
    assert first.doc["base"]["pretrained"] is True and first.doc["base"]["from_cache"] is False
    assert second.doc["base"]["pretrained"] is False and second.doc["base"]["from_cache"] is True
    assert second.doc["base"]["cache_key"] == first.doc["base"]["cache_key"]
    assert Path(second.doc["base"]["cache_file"]).parent.parent == cache_dir
    assert by_name(second.doc)["base"]["target_bpb"] == by_name(first.doc)["base"]["target_bpb"]
    assert second.doc["timing"]["pretrain_seconds"] == 0.0
    assert "reused from the cache" in second.stdout
    assert not [p for p in cache_dir.rglob("*") if p.name.endswith(".tmp")]


def test_module_entry_point_runs_one_variant(runs, tmp_path):
    _, _, cache_dir = runs
    out = tmp_path / "cli"
    args = ["bench", "--quick", "--variants", "lora", "--lr", "full=2e-3", "--cache-dir", str(cache_dir)]
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "lorazoo", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in doc["runs"]] == ["base", "lora", "full"]
    assert doc["base"]["from_cache"] is True
    assert by_name(doc)["full"]["lr"] == 2e-3
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
        run = _bench(tmp_path, cache_dir, "wide", "--variants", "widelora")
    finally:
        lorazoo.unregister(plugin)
    row = by_name(run.doc)["widelora"]
    assert row["config"]["r"] == 16 * QUICK.rank // 8 and row["config"]["alpha"] == 32.0 * QUICK.rank / 8
    assert row["lr"] == pytest.approx(2e-3 * QUICK.lr_scale)
    assert row["target_bpb"] < by_name(run.doc)["base"]["target_bpb"]


def test_rank_rule_keeps_each_variants_default_rank_at_rank_8():
    for name in lorazoo.variants():
        cls = lorazoo.variant(name)
        hyper = comparable_hyper(cls, 8)
        default = cls.config_class()
        assert hyper["r"] == default.r and hyper["alpha"] == pytest.approx(default.alpha)
        cls.config_class.from_kwargs(**hyper)  # a valid config for that variant


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variants", "nosuch"], "registered variants: "),
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
        "--seed",
        "--out",
        "--quick",
        "--lr",
        "--model",
    ):
        assert option in stdout


def test_lr_option_syntax():
    assert parse_lr("2e-3") == {"*": 2e-3}
    assert parse_lr("vera=1e-2,full=1e-4") == {"vera": 1e-2, "full": 1e-4}


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
