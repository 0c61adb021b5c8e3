"""The bench itself: pre-train (or reuse) the base, adapt it with every variant, measure.

Every run starts from the same base weights and sees the same batches in the same order (one
seeded generator per run, same seed), the same number of steps, targets and comparable rank; only
the variant and its learning rate differ. Two baselines frame the adapters: ``base`` (the
untouched model, evaluated only) and ``full`` (every parameter trained, at ``FULL_LR``).

Training uses lorazoo's public API only: ``inject``, ``AdamW(param_groups(...))``,
``extra_loss``, ``after_step``, then ``save`` and ``merge``/``unmerge`` for the file size, the
merge check and the latency ratio.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__
from ..registry import variant as variant_class
from ..registry import variants as registered_variants
from ..variant import Variant, VariantConfig
from . import cache
from .backends import BenchError, ByteBackend, HFBackend, bits_per_byte, next_token_loss
from .data import load_domains
from .measure import PeakMemory, Progress, paired_ratio, sync
from .model import LlamaConfig

BASELINES = ("base", "full")
FULL_LR = 3e-4  # full fine-tuning of the bench model; chosen by measurement (docs/bench.md)

# The bench model: byte-level, 4 layers, width 128, in the Llama layout (lorazoo.bench.model).
BENCH_MODEL = LlamaConfig(
    vocab_size=256, hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4, max_seq_len=256
)
QUICK_MODEL = LlamaConfig(
    vocab_size=256, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=2, max_seq_len=128
)


@dataclass(frozen=True)
class Recipe:
    """Everything about a bench run that is not a per-variant choice."""

    model: LlamaConfig
    seq_len: int
    batch: int
    pretrain_steps: int
    pretrain_lr: float
    steps: int
    rank: int
    seed: int
    targets: tuple[str, ...] = ("all-linear",)
    warmup: float = 0.1  # fraction of the steps with a linear warm-up, then cosine to 10%
    eval_windows: int = 64
    latency_windows: int = 8
    latency_repeats: int = 9
    source_eval_bytes: int = 256 * 1024
    target_eval_bytes: int = 64 * 1024
    source_train_cap: int | None = None
    target_train_cap: int | None = None
    lr_scale: float = 1.0  # applied to the default learning rates (not to explicit --lr values)
    threads: int | None = None  # None: every CPU this process may use

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        d["targets"] = list(self.targets)
        return d


DEFAULT = Recipe(
    model=BENCH_MODEL, seq_len=128, batch=16, pretrain_steps=1000, pretrain_lr=3e-3, steps=120, rank=8, seed=0
)
QUICK = Recipe(
    model=QUICK_MODEL,
    seq_len=64,
    batch=8,
    pretrain_steps=80,
    pretrain_lr=1e-2,
    steps=20,
    rank=4,
    seed=0,
    eval_windows=8,
    latency_windows=2,
    latency_repeats=3,
    lr_scale=5.0,
    threads=1,
    source_eval_bytes=24 * 1024,
    target_eval_bytes=16 * 1024,
    source_train_cap=384 * 1024,
    target_train_cap=128 * 1024,
)


@dataclass
class Options:
    """What the command line asked for (``None`` means: the recipe's value)."""

    variants: list[str] | None = None
    steps: int | None = None
    rank: int | None = None
    targets: list[str] | None = None
    seed: int | None = None
    lr: dict[str, float] = field(default_factory=dict)  # "*" applies to every run
    quick: bool = False
    model_path: str | None = None
    cache_dir: str | None = None
    threads: int | None = None
    device: str = "cpu"
    progress: bool = True


# --------------------------------------------------------------------------------------------
# Choosing per-variant settings
# --------------------------------------------------------------------------------------------

_REF = VariantConfig()  # the family's defaults: r = 8, alpha = 8


def comparable_hyper(cls: type[Variant], rank: int) -> dict[str, Any]:
    """Hyper-parameters for ``cls`` at the bench's ``rank``.

    The rule, for any variant: each config class states the rank its variant is meant to be used
    at (its default ``r``) next to the family's default 8. A variant is run at its own default
    rank scaled by ``rank / 8``, and ``alpha`` at its own default scaled by the same factor, so the
    variant's intended ``alpha / r`` is kept. LoRA-like variants (default ``r = 8``) thus run at
    ``rank`` itself; VeRA (default ``r = 256``, shared frozen projections and only per-layer
    vectors trained) at ``32 × rank``. ``example_config`` (settings a variant requires) comes on
    top.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(cls.config_class)}
    r0 = defaults.get("r", _REF.r)
    a0 = defaults.get("alpha", _REF.alpha)
    factor = rank / _REF.r
    hyper: dict[str, Any] = dict(cls.example_config)
    hyper["r"] = max(1, round(r0 * factor))
    hyper["alpha"] = float(a0) * factor
    return hyper


def resolve_lrs(names: list[str], overrides: dict[str, float], scale: float = 1.0) -> dict[str, float]:
    """Each run's learning rate: ``--lr NAME=`` > ``--lr VALUE`` > the variant's
    ``recommended_lr`` (``FULL_LR`` for full fine-tuning) times ``scale``."""
    lrs: dict[str, float] = {}
    for name in names:
        if name in overrides:
            lrs[name] = overrides[name]
        elif "*" in overrides:
            lrs[name] = overrides["*"]
        elif name == "full":
            lrs[name] = FULL_LR * scale
        else:
            lrs[name] = float(variant_class(name).recommended_lr) * scale
    return lrs


def _threads(requested: int | None) -> int:
    """``requested``, else the CPUs this process may use less those the 1-minute load average
    shows busy (at least 1): on a shared machine, threads beyond the idle cores only contend."""
    if requested is not None:
        return requested
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        busy = int(os.getloadavg()[0])
    except (AttributeError, OSError):
        busy = 0
    return max(1, min(cores, cores - busy))


# --------------------------------------------------------------------------------------------
# Batches and evaluation
# --------------------------------------------------------------------------------------------


class Windows:
    """Fixed-length windows of a token stream: random ones for training, fixed ones for eval."""

    def __init__(self, ids: Tensor, seq_len: int, name: str):
        if ids.numel() < seq_len + 2:
            raise BenchError(
                f"the {name} split has only {ids.numel()} tokens; it needs at least {seq_len + 2}"
            )
        self.ids = ids
        self.span = seq_len + 1

    def sample(self, batch: int, gen: torch.Generator) -> Tensor:
        starts = torch.randint(0, self.ids.numel() - self.span + 1, (batch,), generator=gen)
        return torch.stack([self.ids[s : s + self.span] for s in starts.tolist()])

    def fixed(self, n: int) -> Tensor:
        """``n`` windows spread evenly over the split (non-overlapping when it is long enough)."""
        last = self.ids.numel() - self.span
        n = max(1, min(n, last + 1))
        starts = [round(i * last / max(1, n - 1)) for i in range(n)] if n > 1 else [0]
        return torch.stack([self.ids[s : s + self.span] for s in starts])


@torch.no_grad()
def eval_nats(model: nn.Module, windows: Tensor, batch: int, device: torch.device) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i : i + batch].to(device)
        loss = next_token_loss(model(ids[:, :-1]), ids)
        n = ids[:, 1:].numel()
        total += loss.item() * n
        count += n
    model.train(was_training)
    return total / count


def lr_lambda(steps: int, warmup_frac: float) -> Callable[[int], float]:
    warm = max(1, int(round(steps * warmup_frac)))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    stream: Windows,
    steps: int,
    batch: int,
    seed: int,
    warmup: float,
    device: torch.device,
    progress: Progress,
    hooks: bool,
) -> list[float]:
    """Train ``steps`` steps; returns the loss per step (nats). ``hooks``: call lorazoo's
    ``extra_loss`` and ``after_step`` (adapter runs)."""
    from .. import after_step, extra_loss

    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, warmup))
    gen = torch.Generator().manual_seed(seed)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    curve: list[float] = []
    model.train()
    for step in range(steps):
        ids = stream.sample(batch, gen).to(device)
        loss = next_token_loss(model(ids[:, :-1]), ids)
        total = loss
        if hooks:
            extra = extra_loss(model)
            if extra is not None:
                total = total + extra
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if hooks:
            after_step(model, step)
        optimizer.zero_grad(set_to_none=True)
        sched.step()
        value = loss.item()
        if not math.isfinite(value):
            raise BenchError(f"training diverged at step {step} (loss {value}); try a smaller --lr")
        curve.append(value)
        progress.update(1, f"loss {value:.3f}")
    model.eval()
    return curve


# --------------------------------------------------------------------------------------------
# The bench
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    recipe: Recipe
    names: list[str]  # variants, in run order
    lrs: dict[str, float]
    hyper: dict[str, dict[str, Any]]
    device: torch.device
    threads: int
    options: Options


def make_plan(opts: Options) -> Plan:
    """Check every option against what is installed and registered; nothing is run or written."""
    recipe = QUICK if opts.quick else DEFAULT
    changes: dict[str, Any] = {}
    for name in ("steps", "rank", "seed"):
        value = getattr(opts, name)
        if value is not None:
            if name != "seed" and value < 1:
                raise BenchError(f"--{name} must be a positive integer, got {value}")
            if name == "seed" and value < 0:
                raise BenchError(f"--seed must be a non-negative integer, got {value}")
            changes[name] = value
    if opts.targets is not None:
        if not opts.targets or any(not t for t in opts.targets):
            raise BenchError("--targets needs a comma-separated list of module names, e.g. q_proj,v_proj")
        changes["targets"] = tuple(opts.targets)
    recipe = dataclasses.replace(recipe, **changes)

    known = registered_variants()
    names = list(opts.variants) if opts.variants is not None else [n for n in known if n not in BASELINES]
    if opts.variants is not None:
        if not names:
            raise BenchError("--variants is empty; name at least one of: " + ", ".join(known))
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise BenchError(f"--variants names {', '.join(dup)} more than once")
        unknown = [n for n in names if n not in known]
        if unknown:
            raise BenchError(
                f"unknown variant(s) {', '.join(repr(n) for n in unknown)} in --variants; "
                "registered variants: " + (", ".join(known) or "(none)")
            )
    if any(n in BASELINES for n in names):
        raise BenchError(
            f"a variant named {', '.join(n for n in names if n in BASELINES)!r} clashes with the bench's "
            f"baseline runs {BASELINES}; leave it out with --variants"
        )
    run_names = [*names, "full"]
    bad = [k for k in opts.lr if k != "*" and k not in run_names]
    if bad:
        raise BenchError(
            f"--lr names {', '.join(repr(k) for k in bad)}, which is not among the runs: "
            + ", ".join(run_names)
            + " (write --lr 2e-3 for every run, or --lr NAME=VALUE)"
        )
    for k, v in opts.lr.items():
        if not (math.isfinite(v) and v > 0):
            raise BenchError(f"--lr {k}={v}: a learning rate must be a positive finite number")
    lrs = resolve_lrs(run_names, opts.lr, recipe.lr_scale)

    if opts.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    try:
        device = torch.device(opts.device)
    except RuntimeError as exc:
        raise BenchError(f"--device {opts.device!r} is not a torch device: {exc}") from exc
    if opts.threads is not None and opts.threads < 1:
        raise BenchError(f"--threads must be >= 1, got {opts.threads}")
    hyper = {n: comparable_hyper(variant_class(n), recipe.rank) for n in names}
    threads = _threads(opts.threads if opts.threads is not None else recipe.threads)
    return Plan(recipe, names, lrs, hyper, device, threads, opts)


def _check_injections(plan: Plan, probe: Callable[[], nn.Module]) -> None:
    """Inject each variant into a throwaway model so a bad rank or target fails before any work."""
    from .. import LorazooError, inject

    for name in plan.names:
        model = probe()
        try:
            inject(model, name, list(plan.recipe.targets), **plan.hyper[name])
        except LorazooError as exc:
            raise BenchError(f"variant {name!r} cannot be set up with these options: {exc}") from exc


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
    }
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        info["cpu_affinity"] = None
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _pretrain(
    backend: ByteBackend, recipe: Recipe, source: Windows, device: torch.device, progress: Progress
) -> dict:
    model = backend.new_random(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    progress.describe("pre-training the base")
    w0, c0 = time.perf_counter(), time.process_time()
    curve = train(
        model, opt, source, recipe.pretrain_steps, recipe.batch, recipe.seed, 0.05, device, progress, False
    )
    meta = {
        "steps": recipe.pretrain_steps,
        "seconds": time.perf_counter() - w0,
        "cpu_seconds": time.process_time() - c0,
        "final_loss_nats": sum(curve[-20:]) / len(curve[-20:]),
        "curve": curve,
        "tokens": recipe.pretrain_steps * recipe.batch * recipe.seq_len,
    }
    backend.base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return meta


def run_bench(opts: Options) -> dict[str, Any]:
    """Run the whole bench and return every figure (see docs/bench.md for the fields)."""
    from .. import LorazooError, inject, merge, param_groups, save, trainable, unmerge

    plan = make_plan(opts)
    recipe = plan.recipe
    device = plan.device
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    try:
        if opts.model_path is not None:
            backend: Any = HFBackend(opts.model_path, device)
            if backend.max_seq_len is not None and recipe.seq_len + 1 > backend.max_seq_len:
                recipe = dataclasses.replace(recipe, seq_len=backend.max_seq_len - 1)
        else:
            backend = ByteBackend(recipe.model, device)
        source, target = load_domains(
            recipe.seed,
            recipe.source_eval_bytes,
            recipe.target_eval_bytes,
            recipe.source_train_cap,
            recipe.target_train_cap,
        )
        # A wrong rank or target must fail now, not after pre-training.
        _check_injections(
            plan, (lambda: backend.new_random(0)) if isinstance(backend, ByteBackend) else backend.fresh
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
        src_eval = streams[source.name]["eval"].fixed(recipe.eval_windows)
        tgt_eval = streams[target.name]["eval"].fixed(recipe.eval_windows)
        lat_batch = tgt_eval[: recipe.latency_windows, :-1].to(device)

        n_runs = len(plan.names) + 1
        base_info: dict[str, Any]
        if isinstance(backend, ByteBackend):
            key_recipe = {
                "model": recipe.model.to_dict(),
                "seq_len": recipe.seq_len,
                "batch": recipe.batch,
                "pretrain_steps": recipe.pretrain_steps,
                "pretrain_lr": recipe.pretrain_lr,
                "seed": recipe.seed,
                "source_sha256": source.sha256(),
                "device": device.type,
                "format": 1,
            }
            key = cache.key_of(key_recipe)
            root = cache.cache_dir(opts.cache_dir)
            path = cache.base_path(root, key)
            cached = cache.load_base(path)
            total = n_runs * recipe.steps + (0 if cached else recipe.pretrain_steps)
            progress = Progress(total, enabled=opts.progress)
            if cached is not None:
                backend.base_state = {k: v.to(device) for k, v in cached["state_dict"].items()}
                pre = dict(cached["meta"])
                from_cache = True
            else:
                pre = _pretrain(backend, recipe, streams[source.name]["train"], device, progress)
                cache.save_base(path, backend.base_state, pre)
                from_cache = False
            base_info = {
                "pretrained": not from_cache,
                "from_cache": from_cache,
                "cache_key": key,
                "cache_file": str(path),
                "cache_recipe": key_recipe,
                "pretrain": {k: v for k, v in pre.items() if k != "curve"},
                "pretrain_curve": pre.get("curve", []),
            }
        else:
            progress = Progress(n_runs * recipe.steps, enabled=opts.progress)
            base_info = {"pretrained": False, "from_cache": False, "model": backend.describe()}

        runs: list[dict[str, Any]] = []

        def evaluate(model: nn.Module) -> tuple[float, float]:
            t = eval_nats(model, tgt_eval, recipe.batch, device)
            s = eval_nats(model, src_eval, recipe.batch, device)
            return bits_per_byte(t, bpt[target.name]), bits_per_byte(s, bpt[source.name])

        # ---- base: evaluated, never trained
        progress.describe("evaluating the base")
        model = backend.fresh()
        tb, sb = evaluate(model)
        count = trainable(model)
        runs.append(
            {
                "name": "base",
                "kind": "baseline",
                "variant": None,
                "lr": None,
                "config": None,
                "trainable": 0,
                "total_params": count.total,
                "target_bpb": tb,
                "source_bpb": sb,
            }
        )
        del model
        files: dict[str, bytes] = {}  # adapter files, written into the output folder at the end
        scratch = tempfile.TemporaryDirectory(prefix="lorazoo-bench-")
        adapter_dir = Path(scratch.name)

        for name in [*plan.names, "full"]:
            is_full = name == "full"
            progress.describe(f"training {name}")
            model = backend.fresh()
            config: dict[str, Any] | None
            if is_full:
                for p in model.parameters():
                    p.requires_grad_(True)
                config = None
            else:
                torch.manual_seed(recipe.seed)
                try:
                    inject(model, name, list(recipe.targets), **plan.hyper[name])
                except LorazooError as exc:
                    raise BenchError(f"variant {name!r} cannot be set up with these options: {exc}") from exc
                config = plan.hyper[name]
            count = trainable(model)
            optimizer = torch.optim.AdamW(param_groups(model, lr=plan.lrs[name]), betas=(0.9, 0.999))
            with PeakMemory(device) as mem:
                w0, c0 = time.perf_counter(), time.process_time()
                curve = train(
                    model,
                    optimizer,
                    streams[target.name]["train"],
                    recipe.steps,
                    recipe.batch,
                    recipe.seed + 1,
                    recipe.warmup,
                    device,
                    progress,
                    not is_full,
                )
                sync(device)
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            del optimizer
            tb, sb = evaluate(model)
            row: dict[str, Any] = {
                "name": name,
                "kind": "baseline" if is_full else "variant",
                "variant": None if is_full else name,
                "lr": plan.lrs[name],
                "config": config,
                "trainable": count.trainable,
                "total_params": count.total,
                "train_seconds": wall,
                "train_cpu_seconds": cpu,
                "tokens_per_s": recipe.steps * recipe.batch * recipe.seq_len / wall,
                "peak_memory_bytes": mem.bytes,
                "memory_method": mem.method,
                "target_bpb": tb,
                "source_bpb": sb,
                "final_train_loss_nats": sum(curve[-10:]) / len(curve[-10:]),
                "curve": curve,
            }
            if is_full:
                row["file_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
                row["file_note"] = "bytes of every parameter (a full checkpoint), not written"
            else:
                fpath = adapter_dir / f"{name}.safetensors"
                save(model, fpath)
                row["file_bytes"] = fpath.stat().st_size
                files[f"adapters/{name}.safetensors"] = fpath.read_bytes()
                row.update(
                    _merge_checks(
                        model, tgt_eval[: recipe.batch].to(device), lat_batch, recipe, device, merge, unmerge
                    )
                )
            runs.append(row)
            del model
        scratch.cleanup()
        progress.close()
    finally:
        torch.set_num_threads(saved_threads)

    base = runs[0]
    for row in runs:
        row["learned_bpb"] = base["target_bpb"] - row["target_bpb"]
        row["forgot_bpb"] = row["source_bpb"] - base["source_bpb"]
    return {
        "format": "lorazoo-bench/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": opts_to_dict(opts),
        "recipe": recipe.to_dict(),
        "quick": opts.quick,
        "threads": plan.threads,
        "full_lr": plan.lrs["full"],
        "rank_rule": comparable_hyper.__doc__.split("\n\n")[1].strip() if comparable_hyper.__doc__ else "",
        "model": backend.describe(),
        "data": {"source": source.describe(), "target": target.describe(), "bytes_per_token": bpt},
        "base": base_info,
        "runs": runs,
        "timing": {
            "total_seconds": time.perf_counter() - start_wall,
            "total_cpu_seconds": time.process_time() - start_cpu,
            "pretrain_seconds": base_info.get("pretrain", {}).get("seconds")
            if base_info["pretrained"]
            else 0.0,
        },
        "versions": versions(device),
        "_files": files,
    }


def _merge_checks(
    model: nn.Module,
    batch: Tensor,
    lat_batch: Tensor,
    recipe: Recipe,
    device: torch.device,
    merge: Callable[..., Any],
    unmerge: Callable[..., Any],
) -> dict[str, Any]:
    """Merged-vs-unmerged logits, exact unmerge, and the unmerged/merged latency ratio."""
    model.eval()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ids = batch[:, :-1]
        unmerged = model(ids).float()
        merge(model)
        merged = model(ids).float()
        unmerge(model)
        after = model.state_dict()
        exact = all(torch.equal(before[k], after[k]) for k in before)
        diff = (merged - unmerged).abs().max().item()
        scale = unmerged.abs().max().item()

        def fwd() -> None:
            model(lat_batch)

        lat = paired_ratio(
            fwd,
            fwd,
            lambda: _set_merged(model, False, merge, unmerge),
            lambda: _set_merged(model, True, merge, unmerge),
            device,
            recipe.latency_repeats,
        )
    return {
        "merge_max_abs_diff": diff,
        "logits_max_abs": scale,
        "merge_rel_diff": diff / scale if scale else float("nan"),
        "unmerge_exact": exact,
        "latency_ratio": lat["ratio"],
        "latency_ratio_q1": lat["q1"],
        "latency_ratio_q3": lat["q3"],
        "latency_unmerged_s": lat["first_s"],
        "latency_merged_s": lat["second_s"],
        "latency_pairs": lat["pairs"],
        "latency_tokens": int(lat_batch.numel()),
    }


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
