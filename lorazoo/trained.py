"""Whole modules trained with an adapter (a classifier head, ``lm_head``): PEFT's ``modules_to_save``.

:func:`modules_to_save` gives adapter ``name`` its own full copy of each selected module. The
module in the model is replaced by a :class:`TrainedModules` wrapper that keeps the original's
parameters, buffers and children under the original's own names (so the base's state-dict keys
and tensors stay exactly as they were) and holds the copies under
``<module>.modules_to_save.<adapter>.*``. The forward runs the copy of the active adapter, or the
original when no active adapter has one; two active adapters that both carry a copy of one
module are refused at the forward (which copy to run would be a guess).

Copies are trained like any trainable tensor (:func:`lorazoo.param_groups` puts them in its
``"other"`` group), saved in the adapter's file, restored by :func:`lorazoo.load`, left alone by
merge and unmerge (they are not low-rank updates), and removed with their adapter by
:func:`lorazoo.eject`, which puts the original module object back. Inactive adapters' copies are
frozen like their adapters.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .engine import _interrupt
from .engine.distributed import refuse_sharded
from .engine.inject import _set_child, _transaction, adapters_named, hosts
from .engine.layer import AdaptedLinear
from .errors import LorazooError, RoutingError, TargetError

COPIES = "modules_to_save"  # the wrapper's child holding the copies, as PEFT names it


class TrainedModules(nn.Module):
    """A module of the model with trained copies beside it, one per adapter that owns one.

    ``forward(*args) = copy_of_active_adapter(*args)``, or ``original(*args)`` when no active
    adapter carries a copy.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        for key, p in original._parameters.items():
            self._parameters[key] = p
        for key, b in original._buffers.items():
            self._buffers[key] = b
        self._non_persistent_buffers_set = set(original._non_persistent_buffers_set)
        for key, m in original._modules.items():
            self._modules[key] = m
        self._modules[COPIES] = nn.ModuleDict()
        self._origin = (original,)  # a tuple, so nn.Module does not register it as a child
        self.training = original.training
        self.active: tuple[str, ...] = ()
        # per parked (inactive) adapter: the requires_grad its copy's tensors had
        self._parked: dict[str, dict[str, bool]] = {}
        self.register_load_state_dict_post_hook(_ignore_missing_copies)

    @property
    def original(self) -> nn.Module:
        return self._origin[0]

    @property
    def copies(self) -> nn.ModuleDict:
        return self._modules[COPIES]  # type: ignore[return-value]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            origin = self.__dict__.get("_origin")
            if origin is None:
                raise
            return getattr(origin[0], name)  # the original's plain attributes (in_features, ...)

    def train(self, mode: bool = True) -> TrainedModules:
        super().train(mode)
        self.original.training = mode  # the original is not a child, but its forward may run
        return self

    def running(self) -> str | None:
        """The adapter whose copy the forward runs, or None for the original."""
        owners = [n for n in self.active if n in self.copies]
        if len(owners) > 1:
            raise RoutingError(
                f"active adapters {owners} each carry a trained copy of this module, and only one "
                f"can run; make one of them active (lorazoo.set_active(model, {owners[0]!r}))"
            )
        return owners[0] if owners else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        name = self.running()
        return (self.copies[name] if name is not None else self.original)(*args, **kwargs)

    def set_active(self, names: Sequence[str], park: bool = True) -> None:
        """Follow the model's active adapters; with ``park``, inactive adapters' copies are
        frozen and active ones get back the flags they had. All or nothing."""
        active = tuple(names)
        if park:
            self._set_parked({n for n in self.copies if n not in active})
        self.active = active

    def parked(self) -> frozenset[str]:
        return frozenset(self._parked)

    def _set_parked(self, names: set[str]) -> None:
        flags = [(p, p.requires_grad) for c in self.copies.values() for p in c.parameters()]
        before = dict(self._parked)
        try:
            for name in [n for n in self._parked if n not in names]:
                saved = self._parked.pop(name)
                for key, p in self.copies[name].named_parameters():
                    p.requires_grad_(saved.get(key, p.requires_grad))
            for name in [n for n in names if n not in self._parked and n in self.copies]:
                own = list(self.copies[name].named_parameters())
                self._parked[name] = {key: p.requires_grad for key, p in own}
                for _, p in own:
                    p.requires_grad_(False)
        except BaseException:
            for p, flag in flags:
                p.requires_grad_(flag)
            self._parked = before
            raise

    def add_copy(self, name: str, module: nn.Module, active: Sequence[str]) -> None:
        self.copies[name] = module
        self.active = tuple(active)
        if name not in self.active:
            self._set_parked({*self._parked, name})

    def remove_copy(self, name: str) -> nn.Module:
        self._set_parked(set(self._parked) - {name})
        module = self.copies[name]
        del self.copies[name]
        return module

    def give_back(self) -> nn.Module:
        """The original module, holding the tensors and children this wrapper holds now (a cast
        with ``torch.__future__.set_overwrite_module_params_on_conversion`` makes new ones)."""
        original = self.original
        for key in original._parameters:
            original._parameters[key] = self._parameters[key]
        for key in original._buffers:
            original._buffers[key] = self._buffers[key]
        for key in original._modules:
            original._modules[key] = self._modules[key]
        return original

    def extra_repr(self) -> str:
        copies, active = list(self.copies), list(self.active)
        return f"original={type(self.original).__name__}, copies={copies}, active={active}"


def _ignore_missing_copies(module: TrainedModules, incompatible: Any) -> None:
    """Loading a base checkpoint into a model with trained copies: the copies are not in it, and
    that is expected. Other missing keys are still reported."""
    marker = f"{COPIES}."
    keep = [k for k in incompatible.missing_keys if marker not in k]
    incompatible.missing_keys[:] = keep


def wrappers(model: nn.Module) -> list[tuple[str, TrainedModules]]:
    """Every module of ``model`` that carries trained copies, with its path."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TrainedModules)]


def trained_modules(model: nn.Module, name: str | None = None) -> dict[str, list[str]]:
    """``{module path: [adapter names]}`` for every module with trained copies (only those of
    adapter ``name``, when given)."""
    out = {}
    for path, w in wrappers(model):
        owners = [n for n in w.copies if name is None or n == name]
        if owners:
            out[path] = owners
    return out


def copies_of(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """``{module path: copy}`` of adapter ``name``."""
    return {p: w.copies[name] for p, w in wrappers(model) if name in w.copies}


def _active_names(model: nn.Module) -> tuple[str, ...]:
    """The model's active adapters, in injection order."""
    seen: dict[str, None] = {}
    for _, host in hosts(model):
        for n in host.active:
            seen.setdefault(n)
    return tuple(seen)


def _matches(path: str, targets: Sequence[str]) -> bool:
    """PEFT's rule for ``modules_to_save``: the whole path, or a path ending in ``.<target>``."""
    return any(path == t or path.endswith("." + t) for t in targets)


def check_copyable(model: nn.Module, path: str, module: nn.Module) -> None:
    """Refuse a module that cannot carry trained copies, saying why."""
    if path == "":
        raise TargetError("the whole model cannot be a module to save; name a submodule such as 'classifier'")
    if isinstance(module, AdaptedLinear):
        raise TargetError(
            f"{path!r} carries low-rank adapters; a module is either adapted or saved whole, not both"
        )
    inner = [n for n, m in module.named_modules() if n and isinstance(m, (AdaptedLinear, TrainedModules))]
    if inner:
        raise TargetError(
            f"{path!r} contains {path}.{inner[0]}, which carries adapters or trained copies of its own; "
            "save the inner module, or leave the adapters out of this one"
        )
    parents = [p for p, _ in wrappers(model) if path.startswith(p + ".")]
    if parents:
        raise TargetError(f"{path!r} is inside {parents[0]!r}, which already carries trained copies")
    own = module.original if isinstance(module, TrainedModules) else module
    if COPIES in own._modules or COPIES in own._parameters or COPIES in own._buffers:
        raise TargetError(f"{path!r} has a member named {COPIES!r}, which lorazoo's copies would hide")
    bad = [k for k, t in own.state_dict().items() if not t.is_floating_point()]
    if bad:
        raise TargetError(
            f"{path!r} holds the non-floating-point tensor {bad[0]!r}, which adapter files do not "
            "store; save a module with floating-point tensors only"
        )


def resolve(model: nn.Module, targets: str | Iterable[str]) -> list[tuple[str, nn.Module]]:
    """The modules ``targets`` names (paths or last names, as PEFT matches them), outermost only."""
    names = [targets] if isinstance(targets, str) else list(targets)
    if not names or not all(isinstance(t, str) and t for t in names):
        raise TargetError(f"modules to save must be module names or paths, got {targets!r}")
    found = []
    for path, module in model.named_modules():
        if path and _matches(path, names) and not any(path.startswith(p + ".") for p, _ in found):
            found.append((path, module))
    if not found:
        raise TargetError(
            f"no module of the model is named {names}; give a path such as 'classifier' or "
            "'score' (a name matches every module whose path ends in it)"
        )
    return found


def fresh_copy(module: nn.Module) -> nn.Module:
    """A trainable copy of a module (of the original, for a module already wrapped)."""
    own = module.original if isinstance(module, TrainedModules) else module
    twin = copy.deepcopy(own)
    for p in twin.parameters():
        p.requires_grad_(True)
    return twin


def install(model: nn.Module, name: str, new: dict[str, nn.Module], undo: list[Callable[[], None]]) -> None:
    """Inside an engine transaction: give adapter ``name`` the copies ``new`` (``{path: copy}``),
    appending to ``undo`` what takes each step back."""
    active = _active_names(model)
    for path, twin in new.items():
        _interrupt.checkpoint()
        module = model.get_submodule(path)
        if isinstance(module, TrainedModules):
            wrapper = module
        else:
            wrapper = TrainedModules(module)
            wrapper.active = active
            undo.append(lambda path=path, m=module: _set_child(model, path, m))
            _set_child(model, path, wrapper)
        state = (wrapper.active, dict(wrapper._parked))
        undo.append(lambda w=wrapper, s=state: _drop(w, name, *s))
        wrapper.add_copy(name, twin, active)
    _interrupt.checkpoint()


def _drop(wrapper: TrainedModules, name: str, active: tuple[str, ...], parked: dict) -> None:
    if name in wrapper.copies:
        wrapper.remove_copy(name)
    wrapper.active = active
    wrapper._parked = parked


def remove(model: nn.Module, names: Sequence[str], undo: list[Callable[[], None]]) -> None:
    """Inside an engine transaction: remove the copies of adapters ``names``; a module left
    without copies gets its original module object back."""
    for path, wrapper in wrappers(model):
        mine = [n for n in wrapper.copies if n in names]
        if not mine:
            continue
        _interrupt.checkpoint()
        items = list(wrapper.copies.items())
        parked = dict(wrapper._parked)
        flags = [(p, p.requires_grad) for _, c in items for p in c.parameters()]
        undo.append(lambda w=wrapper, i=items, pk=parked, f=flags: _restore(w, i, pk, f))
        for n in mine:
            wrapper.remove_copy(n)
        if not wrapper.copies:
            held = {
                "_parameters": dict(wrapper.original._parameters),
                "_buffers": dict(wrapper.original._buffers),
                "_modules": dict(wrapper.original._modules),
            }
            undo.append(lambda w=wrapper, h=held: _give_back_undo(w, h))
            undo.append(lambda path=path, w=wrapper: _set_child(model, path, w))
            _set_child(model, path, wrapper.give_back())


def _restore(wrapper: TrainedModules, items: list, parked: dict, flags: list) -> None:
    for k in list(wrapper.copies):
        del wrapper.copies[k]
    for k, v in items:
        wrapper.copies[k] = v
    wrapper._parked = parked
    for p, flag in flags:
        p.requires_grad_(flag)


def _give_back_undo(wrapper: TrainedModules, held: dict) -> None:
    for attr, values in held.items():
        getattr(wrapper.original, attr).clear()
        getattr(wrapper.original, attr).update(values)


def modules_to_save(model: nn.Module, targets: str | Iterable[str], name: str = "default") -> nn.Module:
    """Train the modules ``targets`` names whole with adapter ``name`` (PEFT's ``modules_to_save``).

    ``targets`` are module paths or names, matched as PEFT matches them: a module is selected when
    its path is a target or ends in ``.<target>`` (``"classifier"``, ``"lm_head"``, ``"score"``).
    Adapter ``name`` gets a trainable copy of each, made from the original module (the original
    stays frozen); the forward runs the copy while the adapter is active. Several adapters may
    each have their own copy of one module; when more than one of them is active, the forward
    raises :class:`~lorazoo.RoutingError` instead of guessing. A module that carries low-rank
    adapters, or contains one, cannot be saved whole. The copies go into the adapter's file
    (:func:`lorazoo.save`, both formats), come back with :func:`lorazoo.load`, and leave with
    :func:`lorazoo.eject`. All or nothing. Returns ``model``.
    """
    adapters_named(model, name)  # the adapter must exist
    refuse_sharded(model, "add trained module copies to", "call modules_to_save before fully_shard")
    found = resolve(model, targets)
    new: dict[str, nn.Module] = {}
    for path, module in found:
        check_copyable(model, path, module)
        if isinstance(module, TrainedModules) and name in module.copies:
            raise LorazooError(f"adapter {name!r} already has a trained copy of {path!r}")
        new[path] = fresh_copy(module)
    _transaction(model, lambda undo: install(model, name, new, undo))
    return model


def follow_active(
    model: nn.Module, names: Sequence[str], undo: list[Callable[[], None]], park: bool = True
) -> None:
    """Make every wrapper follow the active set ``names``, appending to ``undo`` (before each
    change) the action that takes it back."""
    for _, w in wrappers(model):
        state = (w.active, dict(w._parked), [(p, p.requires_grad) for p in w.copies.parameters()])
        undo.append(lambda w=w, s=state: _unfollow(w, *s))
        w.set_active(names, park=park)


def _unfollow(w: TrainedModules, active: tuple[str, ...], parked: dict, flags: list) -> None:
    w.active = active
    w._parked = parked
    for p, flag in flags:
        p.requires_grad_(flag)


def state_of(module: nn.Module) -> dict[str, Tensor]:
    """A copy's tensors as saved: its state dict (persistent buffers included)."""
    return dict(module.state_dict(keep_vars=True))


@torch.no_grad()
def filled_copy(module: nn.Module, tensors: dict[str, Tensor]) -> nn.Module:
    """A fresh copy of ``module`` holding ``tensors`` (keys and shapes checked by the caller)."""
    twin = fresh_copy(module)
    own = state_of(twin)
    for key, t in tensors.items():
        own[key].copy_(t)
    return twin
