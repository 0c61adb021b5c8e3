"""Training-side services: counts, optimizer groups, extra losses, per-step hooks, activation."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import LorazooError, PluginError
from ..variant import StepInfo, Variant
from .inject import adapter_names, hosts, iter_adapters
from .layer import layer_kind


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
    """Counts of trainable and all parameters (each shared tensor counted once). Adapters made
    inactive by :func:`set_active` are frozen, so they count as not trainable."""
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
    rate); inactive adapters (:func:`set_active`) are frozen and in no group; trainable
    tensors outside adapters (a head you unfroze) get ``lr``. The groups partition the
    trainable tensors: each appears in exactly one group. Pass the result to any
    ``torch.optim`` optimizer.
    """
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise LorazooError(f"lr must be a positive number, got {lr!r}")
    groups: list[dict[str, Any]] = []
    claimed: dict[int, str] = {}
    parked = {id(h.adapters[n]) for _, h in hosts(model) for n in h.parked()}
    for cls, every in _by_class(model).items():
        adapters = [a for a in every if id(a) not in parked]
        if not adapters:
            continue
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
    """Make ``names`` the active adapters (the ones the forward applies and merge folds in).

    Inactive adapters are frozen while inactive (``requires_grad=False`` on their tensors), so
    they are in no :func:`param_groups` group, not counted by :func:`trainable`, and a
    ``DistributedDataParallel`` wrapper built afterwards does not wait for gradients they never
    get. An adapter made active again gets back exactly the ``requires_grad`` flags it had (a
    tensor you froze yourself stays frozen). Call it before wrapping the model for data
    parallelism: the wrapper fixes its set of trainable tensors when it is built. A routed
    batch (:func:`lorazoo.route`) still runs inactive adapters on their rows, but frozen: make
    the adapters you train through it active. All or nothing: on any error every layer keeps
    its active adapters and flags.
    """
    wanted = [names] if isinstance(names, str) else list(names)
    present = adapter_names(model)
    unknown = [n for n in wanted if n not in present]
    if unknown:
        raise LorazooError(f"no adapter named {unknown}; adapters present: {list(present)}")
    from ..trained import follow_active

    saved = [(host, host.active, host.parked()) for _, host in hosts(model)]
    undo: list = []
    try:
        for host, _, _ in saved:
            host.set_active(wanted)
        follow_active(model, wanted, undo)  # whole-module copies (modules_to_save) follow too
    except BaseException:
        for action in reversed(undo):
            action()
        for host, active, parked in saved:
            host.set_active(active, park=False)
            host._set_parked(set(parked))
        raise
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone: no unmerged adapter is applied inside the block.

    Merged adapters are part of the weights; unmerge them first for the pure base output.
    The block is a temporary view for evaluation (a reference output, a base-model score):
    it leaves ``requires_grad``, :func:`trainable` and :func:`param_groups` as
    :func:`set_active` set them, so an optimizer or wrapper built inside or outside the block
    sees the same tensors.
    """
    from ..trained import wrappers

    saved = [(host, host.active, host.parked()) for _, host in hosts(model)]
    copies = [(w, w.active, w.parked()) for _, w in wrappers(model)]  # modules_to_save
    try:
        for host, _, _ in saved:
            host.set_active((), park=False)
        for w, _, _ in copies:
            w.set_active((), park=False)
        yield model
    finally:
        for host, active, parked in saved:
            # set_active called inside the block re-parked: park again for the restored set
            host.set_active(active, park=host.parked() != parked)
        for w, active, parked in copies:
            w.set_active(active, park=w.parked() != parked)


# --------------------------------------------------------------------------------------------
# Activation checkpointing with a frozen base
# --------------------------------------------------------------------------------------------


def _require_grad(value: Any) -> Any:
    """``value`` with every floating-point tensor in it (also inside tuples, lists and dicts)
    made to require grad; tensors that already do, and all others, are returned as they are."""
    if isinstance(value, Tensor):
        if value.requires_grad or not (value.is_floating_point() or value.is_complex()):
            return value
        return value.detach().requires_grad_()
    if isinstance(value, (tuple, list)):
        items = [_require_grad(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return type(value)((k, _require_grad(v)) for k, v in value.items())
    return value


def _outputs_require_grad(module: nn.Module, args: Any, output: Any) -> Any:
    return _require_grad(output) if torch.is_grad_enabled() else None


def _inputs_require_grad(module: nn.Module, args: Any, kwargs: Any) -> Any:
    return (_require_grad(args), _require_grad(kwargs)) if torch.is_grad_enabled() else None


def enable_input_grads(model: nn.Module, module: nn.Module | None = None) -> list[RemovableHandle]:
    """Make the activations entering the model require grad, so reentrant activation
    checkpointing works on a frozen base.

    ``torch.utils.checkpoint`` with ``use_reentrant=True`` (the default of older Hugging Face
    ``gradient_checkpointing_enable``) gives a checkpointed block's output a gradient only when
    one of its *input tensors* requires grad; the adapter tensors inside the block do not count.
    With the base frozen the hidden states entering the first block come from a frozen
    embedding and require no grad, so the adapters inside every block get no gradient (or
    backward fails with "element 0 of tensors does not require grad"). This registers forward
    hooks that mark those activations as requiring grad (a detached alias of the same values,
    so nothing else changes); gradients are then those of the model without checkpointing.

    The hooks go on the output of ``module`` when given; else of the model's input embeddings
    when it has ``get_input_embeddings()`` (Hugging Face models); else of every embedding layer
    in it; and on a model without any, on the model's own floating-point inputs. They act only
    while grad mode is on and cost one extra input gradient in backward; calling this again
    adds none. Non-reentrant checkpointing (``use_reentrant=False``) does not need it. Returns
    the hooks' handles (``handle.remove()`` takes one off).
    """
    targets: list[nn.Module] = [] if module is None else [module]
    if not targets and callable(getattr(model, "get_input_embeddings", None)):
        try:
            found = model.get_input_embeddings()
        except NotImplementedError:
            found = None
        targets = [found] if isinstance(found, nn.Module) else []
    if not targets:
        targets = [m for m in model.modules() if isinstance(m, nn.Embedding) or layer_kind(m) == "embedding"]
    if not targets:
        return [_hook_once(model, model._forward_pre_hooks, _inputs_require_grad)]
    return [_hook_once(t, t._forward_hooks, _outputs_require_grad) for t in targets]


def _hook_once(target: nn.Module, hooks: dict[int, Any], hook: Any) -> RemovableHandle:
    """Register ``hook`` on ``target`` (a forward pre-hook for the inputs, else a forward hook)
    unless it is already there; the handle either way."""
    for key, registered in hooks.items():
        if registered is hook:
            handle = RemovableHandle(hooks)
            handle.id = key  # the handle of the hook already there
            return handle
    if hook is _inputs_require_grad:
        return target.register_forward_pre_hook(hook, with_kwargs=True)
    return target.register_forward_hook(hook)


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
