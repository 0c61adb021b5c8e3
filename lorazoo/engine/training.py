"""Training-side services: counts, optimizer groups, extra losses, per-step hooks, activation."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..errors import LorazooError, PluginError
from ..variant import StepInfo, Variant
from .inject import adapter_names, hosts, iter_adapters


class TrainableCount(NamedTuple):
    """``(trainable, total)`` parameter counts; ``str()`` reads like a report."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent:.4f}"
        )


def trainable(model: nn.Module) -> TrainableCount:
    """Counts of trainable and all parameters (each shared tensor counted once)."""
    seen: set[int] = set()
    t = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            t += p.numel()
    return TrainableCount(t, total)


def _by_class(model: nn.Module) -> dict[type[Variant], list[Variant]]:
    groups: dict[type[Variant], list[Variant]] = {}
    for _, _, adapter in iter_adapters(model):
        groups.setdefault(type(adapter), []).append(adapter)
    return groups


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups for every trainable tensor of ``model``.

    Each variant shapes the groups of its own adapters (LoRA+ gives ``B`` a larger learning
    rate); trainable tensors outside adapters (a head you unfroze) get ``lr``. The groups
    partition the trainable tensors: each appears in exactly one group. Pass the result to any
    ``torch.optim`` optimizer.
    """
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise LorazooError(f"lr must be a positive number, got {lr!r}")
    groups: list[dict[str, Any]] = []
    claimed: dict[int, str] = {}
    for cls, adapters in _by_class(model).items():
        for group in cls.param_groups(adapters, lr, weight_decay):
            group = dict(group)
            group.setdefault("name", cls.name)
            params = list(group["params"])
            for p in params:
                if not p.requires_grad:
                    raise PluginError(f"variant {cls.name!r} put a frozen tensor in an optimizer group")
                if id(p) in claimed:
                    raise PluginError(
                        f"variant {cls.name!r} put one tensor in two optimizer groups "
                        f"({claimed[id(p)]!r} and {group['name']!r})"
                    )
                claimed[id(p)] = group["name"]
            group["params"] = params
            if params:
                groups.append(group)
        missing = [p for a in adapters for p in a.parameters() if p.requires_grad and id(p) not in claimed]
        if missing:
            raise PluginError(
                f"variant {cls.name!r} left {len(missing)} trainable tensor(s) out of its groups"
            )
    rest = []
    seen = set(claimed)
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            rest.append(p)
    if rest:
        groups.append({"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "other"})
    return groups


def extra_loss(model: nn.Module) -> Tensor | None:
    """The sum of the variants' extra loss terms (AdaLoRA's orthogonality penalty), or None
    when no variant adds one. Add it to the task loss in training."""
    total: Tensor | None = None
    for cls, adapters in _by_class(model).items():
        term = cls.extra_loss(adapters)
        if term is not None:
            total = term if total is None else total + term
    return total


@torch.no_grad()
def after_step(
    model: nn.Module,
    step: int,
    *,
    total_steps: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Run the variants' per-step work; call after ``optimizer.step()``, before ``zero_grad()``.

    ``step`` is the step just taken (0 for the first). ``total_steps`` (the training length) and
    ``optimizer`` are passed on to variants that need them (AdaLoRA's schedule; resizing the
    optimizer's state with its tensors). :func:`attach` does the same from the optimizer's own
    step hooks, with no call in the loop; a model whose hooks are attached ignores this call
    (with a warning, once) rather than running the work twice.
    """
    if _attached_hooks(model):
        _warn_attached(model)
        return
    info = StepInfo(step, total_steps, optimizer)
    for cls, adapters in _by_class(model).items():
        cls.on_step_begin(adapters, info)
        cls.on_step_end(adapters, info)


def set_active(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Make ``names`` the active adapters (the ones the forward applies and merge folds in)."""
    wanted = [names] if isinstance(names, str) else list(names)
    present = adapter_names(model)
    unknown = [n for n in wanted if n not in present]
    if unknown:
        raise LorazooError(f"no adapter named {unknown}; adapters present: {list(present)}")
    for _, host in hosts(model):
        host.set_active(wanted)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone: no unmerged adapter is applied inside the block.

    Merged adapters are part of the weights; unmerge them first for the pure base output.
    """
    saved = [(host, host.active) for _, host in hosts(model)]
    try:
        for host, _ in saved:
            host.set_active(())
        yield model
    finally:
        for host, active in saved:
            host.set_active(active)


# --------------------------------------------------------------------------------------------
# Per-step hooks on the optimizer
# --------------------------------------------------------------------------------------------

# model -> the StepHooks attached to it (weakly keyed: a model that goes away takes them along;
# not an attribute of the model, so copying a model does not copy an optimizer with it)
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, list[StepHooks]] = weakref.WeakKeyDictionary()
_WARNED_ATTACHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _attached_hooks(model: nn.Module) -> list[StepHooks]:
    return [h for h in _ATTACHED.get(model, ()) if h.live]


def _warn_attached(model: nn.Module) -> None:
    if model not in _WARNED_ATTACHED:
        _WARNED_ATTACHED.add(model)
        warnings.warn(
            "lorazoo.after_step was called on a model whose per-step work already runs in the "
            "optimizer hooks lorazoo.attach registered; the call is ignored. Remove the "
            "lorazoo.after_step call from the loop (or call .remove() on attach's handle).",
            UserWarning,
            stacklevel=3,
        )


def _total_from(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise LorazooError(f"total_steps must be a positive integer, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise LorazooError(f"total_steps must be a positive integer, got {value}")
        return value
    found = getattr(value, "total_steps", None)  # e.g. torch.optim.lr_scheduler.OneCycleLR
    if isinstance(found, int) and not isinstance(found, bool) and found >= 1:
        return found
    raise LorazooError(
        f"total_steps must be a positive integer or an LR scheduler with an integer "
        f"'total_steps' attribute (OneCycleLR), got {type(value).__name__}: pass the number of "
        "optimizer steps the training will take"
    )


class StepHooks:
    """The handle :func:`attach` returns: the hooks it registered on one optimizer for one model.

    ``step`` is the number of optimizer steps taken since attaching (the step number the variants
    see; set it when resuming a run). ``total_steps`` may be set, or changed, before any step
    that needs it; variants check it when they read it. ``remove()`` takes the hooks off.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int | None):
        self._model = weakref.ref(model)
        self._optimizer = weakref.ref(optimizer)
        self.step = 0
        self.total_steps = total_steps
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]

    @property
    def live(self) -> bool:
        return bool(self._handles) and self._model() is not None and self._optimizer() is not None

    @property
    def total_steps(self) -> int | None:
        return self._total

    @total_steps.setter
    def total_steps(self, value: Any) -> None:
        self._total = _total_from(value)

    def _run(self, optimizer: torch.optim.Optimizer, begin: bool) -> None:
        model = self._model()
        if model is None:
            return
        info = StepInfo(self.step, self._total, optimizer)
        with torch.no_grad():
            for cls, adapters in _by_class(model).items():
                if begin:
                    cls.on_step_begin(adapters, info)
                else:
                    cls.on_step_end(adapters, info)

    def _pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._run(optimizer, begin=True)

    def _post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            self._run(optimizer, begin=False)
        finally:
            self.step += 1

    def remove(self) -> None:
        """Take the hooks off the optimizer (the model trains on without per-step work)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        model = self._model()
        if model is not None and model in _ATTACHED:
            _ATTACHED[model] = [h for h in _ATTACHED[model] if h is not self]

    def __repr__(self) -> str:
        return f"StepHooks(step={self.step}, total_steps={self._total}, live={self.live})"


def attach(model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: Any = None) -> StepHooks:
    """Run the variants' per-step work from ``optimizer``'s own step hooks.

    After this one call an ordinary loop (``loss.backward(); optimizer.step();
    optimizer.zero_grad()``) needs nothing else: before each update the pre-hook runs every
    variant's :meth:`~lorazoo.Variant.on_step_begin` (final gradients, weights before the
    update), after it the post-hook runs :meth:`~lorazoo.Variant.on_step_end`. Steps an AMP
    ``GradScaler`` skips are not counted. For variants without per-step work the hooks do
    nothing, so attaching is always valid.

    ``total_steps``: the number of optimizer steps the training will take, an LR scheduler with a
    ``total_steps`` attribute (OneCycleLR), or None to give it later through the handle's
    ``total_steps`` (a variant that needs it, AdaLoRA, reports its absence at the first step).
    Returns the :class:`StepHooks` handle.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise LorazooError(
            f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}; pass the "
            "optimizer that steps the adapter tensors"
        )
    total = _total_from(total_steps)
    for h in _attached_hooks(model):
        if h._optimizer() is optimizer:
            raise LorazooError(
                "this optimizer is already attached to this model; use the handle the first "
                "attach returned (or call its .remove() before attaching again)"
            )
    hooks = StepHooks(model, optimizer, total)
    _ATTACHED.setdefault(model, []).append(hooks)
    return hooks
