"""Training-side services: counts, optimizer groups, extra losses, per-step hooks, activation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import LorazooError, PluginError
from ..variant import Variant
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
def after_step(model: nn.Module, step: int) -> None:
    """Run the variants' per-step work; call after ``optimizer.step()``, before ``zero_grad()``."""
    for cls, adapters in _by_class(model).items():
        cls.after_step(adapters, step)


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
    saved = [(host, host.active, host.parked()) for _, host in hosts(model)]
    try:
        for host, _, _ in saved:
            host.set_active(wanted)
    except BaseException:
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
    saved = [(host, host.active, host.parked()) for _, host in hosts(model)]
    try:
        for host, _, _ in saved:
            host.set_active((), park=False)
        yield model
    finally:
        for host, active, parked in saved:
            # set_active called inside the block re-parked: park again for the restored set
            host.set_active(active, park=host.parked() != parked)


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
