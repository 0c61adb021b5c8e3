"""The bench itself: reuse (or pre-train) the base, then one run per configuration and seed.

Every run starts from the same base weights and sees the same number of steps, batch size,
targets and comparable rank; within one seed every run also sees the same batches in the same
order. Two baselines frame the adapters: ``base`` (the untouched model, evaluated only) and
``full`` (every parameter trained, at ``FULL_LR``).

The units: :mod:`.plan` decides the runs, :mod:`.training` is the training loop,
:func:`run_one` trains and measures one configuration at one seed, :func:`run_bench` puts them
together and :mod:`.summary` turns the runs into means, intervals and claim verdicts.

Training uses lorazoo's public API only: ``inject``, ``AdamW(param_groups(...))``,
``extra_loss``, ``after_step``, then ``save`` and ``merge``/``unmerge`` for the file size, the
merge check and the latency ratio.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__
from . import cache
from .backends import BenchError, ByteBackend, HFBackend, bits_per_byte
from .data import Domain, load_domains
from .measure import PeakMemory, Progress, paired_ratio, sync
from .plan import (
    BASELINES,
    DEFAULT,
    FULL_LR,
    PRETRAIN_THREADS,
    QUICK,
    Options,
    Plan,
    Recipe,
    RunSpec,
    comparable_hyper,
    make_plan,
    resolve_lrs,
)
from .summary import summarize
from .training import Windows, eval_nats, train

__all__ = [
    "BASELINES",
    "DEFAULT",
    "FULL_LR",
    "QUICK",
    "Options",
    "Plan",
    "Recipe",
    "comparable_hyper",
    "make_plan",
    "resolve_lrs",
    "run_bench",
    "run_one",
]

FORMAT = "lorazoo-bench/2"
ADAPT_SEED_OFFSET = 1000  # batches of seed s are drawn with generator seed 1000 + s


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def versions(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "lorazoo": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "pretrain_threads": PRETRAIN_THREADS,
    }
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        info["cpu_affinity"] = None
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------------------------
# What every run shares
# --------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """The base, the data and the evaluation windows every run of one bench uses."""

    plan: Plan
    recipe: Recipe
    backend: Any
    source: Domain
    target: Domain
    streams: dict[str, dict[str, Windows]]
    bytes_per_token: dict[str, float]
    src_eval: Tensor
    tgt_eval: Tensor
    progress: Progress = field(default_factory=lambda: Progress(1, enabled=False))
    scratch: Path | None = None
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.plan.device

    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """``(target bpb, source bpb)`` on the fixed eval windows."""
        r = self.recipe
        t = eval_nats(model, self.tgt_eval, r.batch, self.device)
        s = eval_nats(model, self.src_eval, r.batch, self.device)
        return (
            bits_per_byte(t, self.bytes_per_token[self.target.name]),
            bits_per_byte(s, self.bytes_per_token[self.source.name]),
        )


def load_setup(plan: Plan) -> Setup:
    """The backend and both domains, tokenised; the base itself is loaded by :func:`prepare_base`."""
    recipe = plan.recipe
    if plan.options.model_path is not None:
        backend: Any = HFBackend(plan.options.model_path, plan.device)
        if backend.max_seq_len is not None and recipe.seq_len + 1 > backend.max_seq_len:
            recipe = dataclasses.replace(recipe, seq_len=backend.max_seq_len - 1)
    else:
        backend = ByteBackend(recipe.model, plan.device)
    source, target = load_domains(
        recipe.base_seed,
        recipe.source_eval_bytes,
        recipe.target_eval_bytes,
        recipe.source_train_cap,
        recipe.target_train_cap,
    )
    streams: dict[str, dict[str, Windows]] = {}
    bpt: dict[str, float] = {}
    for dom in (source, target):
        tr_ids, ev_ids = backend.encode(dom.train.data), backend.encode(dom.eval.data)
        streams[dom.name] = {
            "train": Windows(tr_ids, recipe.seq_len, f"{dom.name} train"),
            "eval": Windows(ev_ids, recipe.seq_len, f"{dom.name} eval"),
        }
        bpt[dom.name] = backend.bytes_per_token(dom.eval.data, ev_ids)
    return Setup(
        plan,
        recipe,
        backend,
        source,
        target,
        streams,
        bpt,
        streams[source.name]["eval"].fixed(recipe.eval_windows),
        streams[target.name]["eval"].fixed(recipe.eval_windows),
    )


def check_injections(setup: Setup) -> None:
    """Inject each configuration into a throwaway model so a bad rank or target fails before any
    work."""
    from .. import LorazooError, inject

    backend = setup.backend
    probe = (lambda: backend.new_random(0)) if isinstance(backend, ByteBackend) else backend.fresh
    for spec in setup.plan.specs:
        if spec.hyper is None:
            continue
        model = probe()
        try:
            inject(model, spec.name, list(setup.recipe.targets), **spec.hyper)
        except LorazooError as exc:
            raise BenchError(f"variant {spec.label!r} cannot be set up with these options: {exc}") from exc


def base_key(setup: Setup) -> dict[str, Any]:
    """Everything the pre-trained base's bits depend on (hashed into its cache file name)."""
    r = setup.recipe
    return {
        "model": r.model.to_dict(),
        "seq_len": r.seq_len,
        "batch": r.pretrain_batch,
        "pretrain_steps": r.pretrain_steps,
        "pretrain_lr": r.pretrain_lr,
        "seed": r.base_seed,
        "source_sha256": setup.source.sha256(),
        "device": setup.device.type,
        "threads": PRETRAIN_THREADS,
        "torch": torch.__version__,
        "format": 2,
    }


def pretrain(setup: Setup) -> dict[str, Any]:
    """Pre-train the byte-level base on the source domain (on ``PRETRAIN_THREADS`` threads, so
    the result does not depend on the machine's thread count)."""
    r, backend = setup.recipe, setup.backend
    model = backend.new_random(r.base_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=r.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    setup.progress.describe("pre-training the base")
    w0, c0 = time.perf_counter(), time.process_time()
    with torch_threads(PRETRAIN_THREADS):
        curve = train(
            model,
            opt,
            setup.streams[setup.source.name]["train"],
            r.pretrain_steps,
            r.pretrain_batch,
            r.base_seed,
            0.05,
            setup.device,
            setup.progress,
            False,
        )
    backend.base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {
        "steps": r.pretrain_steps,
        "seconds": time.perf_counter() - w0,
        "cpu_seconds": time.process_time() - c0,
        "final_loss_nats": sum(curve[-20:]) / len(curve[-20:]),
        "curve": curve,
        "tokens": r.pretrain_steps * r.pretrain_batch * r.seq_len,
    }


def prepare_base(setup: Setup) -> dict[str, Any]:
    """Load the cached base or pre-train it; starts the progress bar. Returns the base's record."""
    plan, r = setup.plan, setup.recipe
    work = plan.total_runs * r.steps
    if not isinstance(setup.backend, ByteBackend):
        setup.progress = Progress(work, enabled=plan.options.progress)
        return {"pretrained": False, "from_cache": False, "model": setup.backend.describe()}
    key_recipe = base_key(setup)
    key = cache.key_of(key_recipe)
    path = cache.base_path(cache.cache_dir(plan.options.cache_dir), key)
    cached = cache.load_base(path)
    setup.progress = Progress(work + (0 if cached else r.pretrain_steps), enabled=plan.options.progress)
    if cached is not None:
        setup.backend.base_state = {k: v.to(setup.device) for k, v in cached["state_dict"].items()}
        pre = dict(cached["meta"])
    else:
        pre = pretrain(setup)
        cache.save_base(path, setup.backend.base_state, pre)
    return {
        "pretrained": cached is None,
        "from_cache": cached is not None,
        "cache_key": key,
        "cache_file": str(path),
        "cache_recipe": key_recipe,
        "pretrain": {k: v for k, v in pre.items() if k != "curve"},
        "pretrain_curve": pre.get("curve", []),
    }


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def base_row(setup: Setup) -> dict[str, Any]:
    """The untouched base, evaluated (the same for every seed)."""
    from .. import trainable

    setup.progress.describe("evaluating the base")
    model = setup.backend.fresh()
    tb, sb = setup.evaluate(model)
    return {
        "name": "base",
        "label": "base",
        "kind": "baseline",
        "variant": None,
        "rank": None,
        "seed": None,
        "lr": None,
        "config": None,
        "trainable": 0,
        "total_params": trainable(model).total,
        "target_bpb": tb,
        "source_bpb": sb,
    }


def run_one(setup: Setup, spec: RunSpec, seed: int, latency: bool = False) -> dict[str, Any]:
    """Train ``spec`` at ``seed`` from the base and measure it. The seed sets the adapter's
    initialisation (``torch.manual_seed(seed)`` before ``inject``) and the batch order (a
    generator seeded with ``1000 + seed``). ``latency``: also time unmerged vs merged inference."""
    from .. import LorazooError, inject, param_groups, save, trainable
    from ..engine.inject import iter_adapters

    r, device = setup.recipe, setup.device
    is_full = spec.hyper is None
    setup.progress.describe(f"training {spec.label} (seed {seed})")
    t_run = time.perf_counter()
    model = setup.backend.fresh()
    if is_full:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        torch.manual_seed(seed)
        try:
            inject(model, spec.name, list(r.targets), **(spec.hyper or {}))
        except LorazooError as exc:
            raise BenchError(f"variant {spec.label!r} cannot be set up with these options: {exc}") from exc
    count = trainable(model)
    optimizer = torch.optim.AdamW(param_groups(model, lr=spec.lr), betas=(0.9, 0.999))
    with PeakMemory(device) as mem:
        w0, c0 = time.perf_counter(), time.process_time()
        curve = train(
            model,
            optimizer,
            setup.streams[setup.target.name]["train"],
            r.steps,
            r.batch,
            ADAPT_SEED_OFFSET + seed,
            r.warmup,
            device,
            setup.progress,
            not is_full,
        )
        sync(device)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    del optimizer
    # after training: a variant whose budget shrinks while training (AdaLoRA) ends with fewer
    count_start, count = count, trainable(model)
    tb, sb = setup.evaluate(model)
    q, w = max(1, r.steps // 4), max(1, r.steps // 10)
    row: dict[str, Any] = {
        "name": spec.name,
        "label": spec.label,
        "kind": "baseline" if is_full else "variant",
        "variant": None if is_full else spec.name,
        "rank": spec.rank,
        "seed": seed,
        "lr": spec.lr,
        "config": spec.hyper,
        "trainable": count.trainable,
        "trainable_at_start": count_start.trainable,
        "total_params": count.total,
        "train_seconds": wall,
        "train_cpu_seconds": cpu,
        "tokens_per_s": r.steps * r.batch * r.seq_len / wall,
        "peak_memory_bytes": mem.bytes,
        "memory_method": mem.method,
        "target_bpb": tb,
        "source_bpb": sb,
        "early_loss": sum(curve[:q]) / q,
        "final_loss": sum(curve[-w:]) / w,
        "curve": curve,
    }
    if is_full:
        row["file_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        row["file_note"] = "bytes of every parameter (a full checkpoint), not written"
    else:
        assert setup.scratch is not None
        fpath = setup.scratch / f"{spec.label}-{seed}.safetensors"
        save(model, fpath)
        row["file_bytes"] = fpath.stat().st_size
        if latency:  # the first seed at the main rank: keep its adapter file in the output
            setup.files[f"adapters/{spec.name}.safetensors"] = fpath.read_bytes()
        fpath.unlink()
        row.update(merge_checks(setup, model, latency))
        name, adapter = next((n, a) for _, n, a in iter_adapters(model))
        row.update(type(adapter).bench_record(model, name))
    row["run_seconds"] = time.perf_counter() - t_run
    return row


def run_bench(opts: Options) -> dict[str, Any]:
    """Run the whole bench and return every figure (see docs/bench.md for the fields)."""
    plan = make_plan(opts)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    with torch_threads(plan.threads):
        setup = load_setup(plan)
        check_injections(setup)  # a wrong rank or target must fail now, not after pre-training
        base_info = prepare_base(setup)
        runs = [base_row(setup)]
        main_rank = setup.recipe.rank
        with tempfile.TemporaryDirectory(prefix="lorazoo-bench-") as scratch:
            setup.scratch = Path(scratch)
            for i, seed in enumerate(plan.seeds):
                for spec in plan.specs:
                    first = i == 0 and spec.hyper is not None and spec.rank == main_rank
                    runs.append(run_one(setup, spec, seed, latency=first))
        setup.progress.close()
        info = versions(plan.device)
    base = runs[0]
    for row in runs:
        row["learned_bpb"] = base["target_bpb"] - row["target_bpb"]
        row["forgot_bpb"] = row["source_bpb"] - base["source_bpb"]
    recipe = setup.recipe
    result: dict[str, Any] = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": opts_to_dict(opts),
        "recipe": recipe.to_dict(),
        "quick": opts.quick,
        "seeds": list(plan.seeds),
        "ranks": sorted({s.rank for s in plan.specs if s.rank is not None}),
        "threads": plan.threads,
        "full_lr": plan.lrs["full"],
        "rank_rule": " ".join((comparable_hyper.__doc__ or "").split()),
        "seed_rule": (
            f"a seed s sets the adapter initialisation (torch.manual_seed(s) before inject) and the "
            f"order of the adaptation batches (generator seed {ADAPT_SEED_OFFSET} + s); the base and "
            f"the data splits use the fixed base seed {recipe.base_seed}"
        ),
        "model": setup.backend.describe(),
        "data": {
            "source": setup.source.describe(),
            "target": setup.target.describe(),
            "bytes_per_token": setup.bytes_per_token,
        },
        "base": base_info,
        "runs": runs,
        "claims_requested": opts.claims,
        "timing": {
            "total_seconds": time.perf_counter() - start_wall,
            "total_cpu_seconds": time.process_time() - start_cpu,
            "pretrain_seconds": base_info.get("pretrain", {}).get("seconds")
            if base_info["pretrained"]
            else 0.0,
        },
        "versions": info,
        "_files": setup.files,
    }
    result["summary"] = summarize(result, plan.claims)
    return result


def merge_checks(setup: Setup, model: nn.Module, latency: bool) -> dict[str, Any]:
    """Merged-vs-unmerged logits and exact unmerge; with ``latency`` the unmerged/merged latency
    ratio too."""
    from .. import merge, unmerge

    r, device = setup.recipe, setup.device
    model.eval()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: dict[str, Any] = {}
    with torch.no_grad():
        ids = setup.tgt_eval[: r.batch, :-1].to(device)
        unmerged = model(ids).float()
        merge(model)
        merged = model(ids).float()
        unmerge(model)
        after = model.state_dict()
        diff = (merged - unmerged).abs().max().item()
        scale = unmerged.abs().max().item()
        out = {
            "merge_max_abs_diff": diff,
            "logits_max_abs": scale,
            "merge_rel_diff": diff / scale if scale else float("nan"),
            "unmerge_exact": all(torch.equal(before[k], after[k]) for k in before),
        }
        if not latency:
            return out
        lat_batch = setup.tgt_eval[: r.latency_windows, :-1].to(device)

        def fwd() -> None:
            model(lat_batch)

        lat = paired_ratio(
            fwd,
            fwd,
            lambda: _set_merged(model, False, merge, unmerge),
            lambda: _set_merged(model, True, merge, unmerge),
            device,
            r.latency_repeats,
        )
    out.update(
        {
            "latency_ratio": lat["ratio"],
            "latency_ratio_q1": lat["q1"],
            "latency_ratio_q3": lat["q3"],
            "latency_unmerged_s": lat["first_s"],
            "latency_merged_s": lat["second_s"],
            "latency_pairs": lat["pairs"],
            "latency_tokens": int(lat_batch.numel()),
        }
    )
    return out


def _set_merged(
    model: nn.Module, merged: bool, merge: Callable[..., Any], unmerge: Callable[..., Any]
) -> None:
    from .. import merge_report

    is_merged = merge_report(model).layers > 0
    if merged and not is_merged:
        merge(model)
    elif not merged and is_merged:
        unmerge(model)


def opts_to_dict(opts: Options) -> dict[str, Any]:
    d = dataclasses.asdict(opts)
    d.pop("progress", None)
    return d
