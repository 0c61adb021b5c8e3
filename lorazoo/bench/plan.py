"""Planning a bench: the recipe, the options, and the list of runs they imply.

``make_plan(Options(...))`` checks every option against what is installed and registered and
returns a :class:`Plan`: the runs (variant or baseline, rank, learning rate, inject kwargs), the
seeds each is repeated over, and the claims to evaluate. Nothing is trained or written.

What a seed varies: the order of the adaptation batches and the adapter's initialisation. The
pre-trained base and the data splits depend on ``Recipe.base_seed`` only (fixed), so every seed
adapts the same cached base and comparisons between variants are paired by seed.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..claims import Claim, Ref
from ..errors import closest
from ..registry import variant as variant_class
from ..registry import variants as registered_variants
from ..variant import Variant
from .backends import BenchError
from .model import LlamaConfig

BASELINES = ("base", "full")
FULL_LR = 3e-4  # full fine-tuning of the bench model; chosen by measurement (docs/bench.md)
PRETRAIN_THREADS = 1  # the base is pre-trained on one thread, so it is the same bits on any machine

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
    batch: int  # adaptation batch (windows per step)
    pretrain_batch: int
    pretrain_steps: int
    pretrain_lr: float
    steps: int
    rank: int
    seeds: tuple[int, ...]
    base_seed: int = 0  # the base's initialisation, pre-training batches and data splits
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
        d["seeds"] = list(self.seeds)
        return d


DEFAULT = Recipe(
    model=BENCH_MODEL,
    seq_len=128,
    batch=8,
    pretrain_batch=16,
    pretrain_steps=800,
    pretrain_lr=3e-3,
    steps=60,
    rank=8,
    seeds=(0, 1, 2),
)
QUICK = Recipe(
    model=QUICK_MODEL,
    seq_len=64,
    batch=8,
    pretrain_batch=8,
    pretrain_steps=80,
    pretrain_lr=1e-2,
    steps=20,
    rank=4,
    seeds=(0, 1),
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
    ranks: list[int] | None = None  # a rank sweep: every variant at each of these ranks too
    targets: list[str] | None = None
    seeds: list[int] | None = None
    claims: bool = False  # add the runs the variants' claims need, and evaluate them
    lr: dict[str, float] = field(default_factory=dict)  # "*" applies to every run
    quick: bool = False
    model_path: str | None = None
    cache_dir: str | None = None
    threads: int | None = None
    device: str = "cpu"
    progress: bool = True


@dataclass(frozen=True)
class RunSpec:
    """One configuration to train (repeated once per seed)."""

    name: str  # a variant name, or "full"
    rank: int | None  # the bench rank (None for full fine-tuning)
    lr: float
    hyper: dict[str, Any] | None  # inject kwargs (None for full fine-tuning)
    label: str = ""  # the name, with "@r<rank>" for a rank other than the main one

    @property
    def key(self) -> tuple[str, int | None]:
        return (self.name, self.rank)


@dataclass
class Plan:
    recipe: Recipe
    names: list[str]  # the variants asked for, in run order
    specs: list[RunSpec]  # every configuration, main rank first
    claims: list[tuple[str, Claim]]  # (variant, claim) to evaluate
    device: torch.device
    threads: int
    options: Options

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.recipe.seeds

    @property
    def lrs(self) -> dict[str, float]:
        return {s.name: s.lr for s in self.specs}

    @property
    def total_runs(self) -> int:
        return len(self.specs) * len(self.seeds)


# --------------------------------------------------------------------------------------------
# Per-variant settings
# --------------------------------------------------------------------------------------------


def comparable_hyper(cls: type[Variant], rank: int) -> dict[str, Any]:
    """The inject kwargs of ``cls`` at the bench's ``rank``: its ``example_config`` (settings it
    requires) under its ``bench_kwargs(rank)`` (by default ``r = rank`` for a variant whose
    config defaults to the family's ``r = 8``, its own default rank scaled by ``rank / 8``
    otherwise — VeRA runs at ``32 × rank``; ``alpha`` stays at the config's default)."""
    return {**cls.example_config, **cls.bench_kwargs(rank)}


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


def choose_threads(requested: int | None) -> int:
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
# The plan
# --------------------------------------------------------------------------------------------


def _recipe(opts: Options) -> Recipe:
    recipe = QUICK if opts.quick else DEFAULT
    changes: dict[str, Any] = {}
    for name in ("steps", "rank"):
        value = getattr(opts, name)
        if value is not None:
            if value < 1:
                raise BenchError(f"--{name} must be a positive integer, got {value}")
            changes[name] = value
    if opts.seeds is not None:
        if not opts.seeds or any(s < 0 for s in opts.seeds):
            raise BenchError(
                f"--seeds needs non-negative seeds (e.g. --seeds 3 or --seeds 0,1,2), got {opts.seeds}"
            )
        if len(set(opts.seeds)) != len(opts.seeds):
            raise BenchError(f"--seeds names a seed more than once: {opts.seeds}")
        changes["seeds"] = tuple(opts.seeds)
    if opts.targets is not None:
        if not opts.targets or any(not t for t in opts.targets):
            raise BenchError("--targets needs a comma-separated list of module names, e.g. q_proj,v_proj")
        changes["targets"] = tuple(opts.targets)
    return dataclasses.replace(recipe, **changes)


def _variant_names(opts: Options) -> list[str]:
    known = registered_variants()
    if opts.variants is None:
        return [n for n in known if n not in BASELINES]
    names = list(opts.variants)
    if not names:
        raise BenchError("--variants is empty; name at least one of: " + ", ".join(known))
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BenchError(f"--variants names {', '.join(dup)} more than once")
    for n in names:
        if n not in known:
            near = closest(n, known)
            hint = f" (did you mean {near!r}?)" if near else ""
            raise BenchError(
                f"unknown variant {n!r} in --variants{hint}; registered variants: "
                + (", ".join(known) or "(none)")
            )
    clash = [n for n in names if n in BASELINES]
    if clash:
        raise BenchError(
            f"a variant named {', '.join(clash)!r} clashes with the bench's baseline runs {BASELINES}; "
            "leave it out with --variants"
        )
    return names


def _claim_refs(
    names: list[str], main_rank: int
) -> tuple[list[tuple[str, Claim]], list[tuple[str, int | None]]]:
    """The claims of ``names`` and every (run, rank) they read, in first-seen order."""
    known = set(registered_variants())
    claims: list[tuple[str, Claim]] = []
    needed: list[tuple[str, int | None]] = []
    for name in names:
        for claim in variant_class(name).claims:
            refs: list[Ref] = claim.refs()
            if any(r.run != "full" and r.run not in known for r in refs):
                continue  # a claim about a variant that is not installed cannot be checked here
            claims.append((name, claim))
            for r in refs:
                key = (
                    ("full", None)
                    if r.run == "full"
                    else (r.run, r.rank if r.rank is not None else main_rank)
                )
                if key not in needed:
                    needed.append(key)
    return claims, needed


def make_plan(opts: Options) -> Plan:
    """Check every option against what is installed and registered; nothing is run or written."""
    recipe = _recipe(opts)
    names = _variant_names(opts)
    ranks = [recipe.rank]
    if opts.ranks is not None:
        if not opts.ranks or any(r < 1 for r in opts.ranks):
            raise BenchError(f"--ranks needs positive ranks, e.g. --ranks 4,16,64; got {opts.ranks}")
        ranks += [r for r in sorted(set(opts.ranks)) if r != recipe.rank]

    claims, needed = _claim_refs(names, recipe.rank)
    keys: list[tuple[str, int | None]] = [(n, r) for r in ranks for n in names]
    keys.append(("full", None))
    if opts.claims:
        keys += [k for k in needed if k not in keys]
    run_names = list(dict.fromkeys(k[0] for k in keys))

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
    specs = [
        RunSpec(
            n,
            r,
            lrs[n],
            None if n == "full" else comparable_hyper(variant_class(n), int(r or 0)),
            n if r in (None, recipe.rank) else f"{n}@r{r}",
        )
        for n, r in keys
    ]

    if opts.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    try:
        device = torch.device(opts.device)
    except RuntimeError as exc:
        raise BenchError(f"--device {opts.device!r} is not a torch device: {exc}") from exc
    if opts.threads is not None and opts.threads < 1:
        raise BenchError(f"--threads must be >= 1, got {opts.threads}")
    threads = choose_threads(opts.threads if opts.threads is not None else recipe.threads)
    return Plan(recipe, names, specs, claims, device, threads, opts)
