"""inject / eject, atomic over the whole model.

Injection is planned first (targets resolved, every adapter built) without touching the model;
only a complete plan is committed. A failure while committing (a variant's base preparation)
rolls back what was done, so the model is either fully adapted or exactly as it was.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import registry
from ..errors import ConfigError, LorazooError, MergeError
from ..variant import LayerInfo, Variant, VariantConfig
from . import _interrupt
from .distributed import local_view, refuse_sharded
from .host import AdaptedLayer
from .kinds import kind_of, stored_weight
from .layer import host_for
from .targets import ALL_LINEAR, TargetSpec, resolve

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_FROZEN = "_lorazoo_frozen"  # model attribute: requires_grad of every parameter before injection


def hosts(model: nn.Module) -> list[tuple[str, AdaptedLayer]]:
    """Every adapted layer of ``model`` with its path."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptedLayer)]


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """The byte range ``[start, stop)`` of ``t``'s storage that its elements occupy."""
    size = t.element_size()
    start = t.storage_offset() * size
    if t.numel() == 0:
        return start, start
    last = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True))
    return start, start + (last + 1) * size


def tied_elsewhere(model: nn.Module, pairs: Sequence[tuple[str, nn.Module]]) -> dict[str, list[str]]:
    """For each ``(path, layer)``, the names of the model's other parameters whose elements
    overlap the layer's weight in memory (an embedding tied to the output head). Writing that
    weight in place would change those too. Views of disjoint parts of one buffer are not ties."""
    by_storage: dict[tuple, list[tuple[str, tuple[int, int]]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.device.type == "meta":
            continue
        p = local_view(p)  # a sharded parameter (FSDP2): this process's shard
        key = (p.device, p.untyped_storage().data_ptr())
        by_storage.setdefault(key, []).append((name, _extent(p)))
    out = {}
    for path, layer in pairs:
        w = stored_weight(layer)
        if w.device.type == "meta":
            continue
        w = local_view(w)
        kind = kind_of(layer)
        wname = kind.host_class.weight_name if kind is not None else "weight"
        own = f"{path}.{wname}" if path else wname
        lo, hi = _extent(w)
        others = [
            n
            for n, (a, b) in by_storage.get((w.device, w.untyped_storage().data_ptr()), [])
            if n != own and a < hi and lo < b
        ]
        if others:
            out[path] = others
    return out


def adapter_names(model: nn.Module) -> dict[str, str]:
    """``{adapter name: variant name}`` for every adapter in ``model``, in injection order."""
    out: dict[str, str] = {}
    for _, host in hosts(model):
        for name, adapter in host.adapters.items():
            out.setdefault(name, type(adapter).name)
    return out


def adapters_named(model: nn.Module, name: str) -> list[tuple[str, AdaptedLayer, Variant]]:
    """``(path, host, adapter)`` for each layer that carries adapter ``name``."""
    found = [(p, h, h.adapters[name]) for p, h in hosts(model) if name in h.adapters]
    if not found:
        present = list(adapter_names(model))
        raise LorazooError(f"the model has no adapter named {name!r}; adapters present: {present or 'none'}")
    return found


def default_adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Adapters train in fp32 on half-precision bases (as PEFT does), else in the base dtype."""
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


def build_config(cls: type[Variant], config: VariantConfig | None, hyper: dict[str, Any]) -> VariantConfig:
    """The config to use: ``config`` (never mutated) with ``hyper`` applied, or one built from
    ``hyper`` alone."""
    if config is None:
        return cls.config_class.from_kwargs(**hyper)
    if not isinstance(config, cls.config_class):
        raise ConfigError(
            f"config is a {type(config).__name__}, but variant {cls.name!r} takes {cls.config_class.__name__}"
        )
    return config.replace(**hyper) if hyper else config


@dataclass
class _Entry:
    path: str
    host: AdaptedLayer
    new_host: bool
    adapter: Variant


@dataclass
class Plan:
    """A complete, not yet applied injection."""

    name: str
    cls: type[Variant]
    config: VariantConfig
    entries: list[_Entry]
    shared: nn.Module | None


def plan(
    model: nn.Module,
    variant: str | type[Variant],
    targets: TargetSpec = ALL_LINEAR,
    *,
    name: str = "default",
    config: VariantConfig | None = None,
    dtype: torch.dtype | None = None,
    **hyper: Any,
) -> Plan:
    """Build every adapter an injection needs, without changing ``model``."""
    cls = registry.variant(variant)
    if not isinstance(name, str) or not _NAME.match(name) or hasattr(nn.ModuleDict, name):
        raise ConfigError(
            f"adapter name {name!r} is not usable: use letters, digits, '_' or '-', starting "
            "with a letter or '_' (e.g. 'default', 'task_a')"
        )
    cfg = build_config(cls, config, hyper)
    refuse_sharded(model, "add adapters to", "inject (or load new adapters) before calling fully_shard")
    if name in adapter_names(model):
        raise LorazooError(
            f"the model already has an adapter named {name!r}; pick another name or eject it first"
        )
    matches = resolve(model, targets)
    from ..quant.model import storage_for  # a variant with ``base_storage`` (QLoRA): quantised targets

    matches = storage_for(cls, cfg, matches)
    layers: list[LayerInfo] = []
    for path, module in matches:
        if isinstance(module, AdaptedLayer) and module.merged is not None:
            raise MergeError(f"layer {path!r} has merged adapters; unmerge before injecting more")
        kind = kind_of(module)
        assert kind is not None  # resolve() checked it
        weight = stored_weight(module)
        d_out, d_in = kind.dims(module)
        view = module.weight_view() if isinstance(module, AdaptedLayer) else kind.weight_view(weight)
        layers.append(
            LayerInfo(
                path=path,
                d_in=d_in,
                d_out=d_out,
                weight=view.detach(),
                has_bias=getattr(module, "bias", None) is not None,
                adapter_dtype=dtype or default_adapter_dtype(weight.dtype),
                kind=kind.adapts_as,
                storage=kind.storage,
            )
        )
    for layer in layers:
        if layer.kind not in cls.layer_kinds:
            raise ConfigError(
                f"variant {cls.name!r} does not adapt {layer.kind} layers such as {layer.path!r} "
                f"(it adapts: {', '.join(sorted(cls.layer_kinds))}); leave that layer out of the "
                "targets, or use a variant that does, e.g. 'lora'"
            )
        cls.check_layer(layer, cfg)
    if cls.prepare_base is not Variant.prepare_base:
        fixed = [(p, k) for p, m in matches if not (k := kind_of(m)).host_class.base_rewrites]  # type: ignore[union-attr]
        if fixed:
            path, kind = fixed[0]
            raise ConfigError(
                f"variant {cls.name!r} rewrites the base weight of each layer it adapts, which "
                f"{kind.name} layers such as {path!r} cannot hold (their storage is fixed): leave "
                "them out of the targets, or use a variant that does not rewrite the base"
            )
        ties = tied_elsewhere(model, matches)
        if ties:
            path, others = next(iter(ties.items()))
            raise ConfigError(
                f"variant {cls.name!r} rewrites the base weight of each layer it adapts, but the "
                f"weight of {path!r} is tied to {others} (one tensor shared by both), which the "
                "rewrite would change too: leave that layer out of the targets or untie the weights"
            )
    shared = cls.shared_state(cfg, layers)
    entries = []
    for (path, module), layer in zip(matches, layers, strict=False):
        new = not isinstance(module, AdaptedLayer)
        host = host_for(module) if new else module
        entries.append(_Entry(path, host, new, cls(layer, cfg, shared)))
    return Plan(name, cls, cfg, entries, shared)


def _restore_adapters(host: AdaptedLayer, items: list, active: tuple[str, ...]) -> None:
    """Put a host's adapters (in their order) and active set back as they were."""
    if list(host.adapters.items()) != items:
        for k in list(host.adapters):
            del host.adapters[k]
        for k, v in items:
            host.adapters[k] = v
    host.active = active
    host._refresh()


def _restore_flags(model: nn.Module, frozen: dict | None, flags: dict[str, bool]) -> None:
    if frozen is None:
        model.__dict__.pop(_FROZEN, None)
    else:
        model.__dict__[_FROZEN] = frozen
    for n, t in model.named_parameters():
        if n in flags and t.requires_grad != flags[n]:
            _set_grad(t, flags[n])


def _set_grad(t: torch.Tensor, flag: bool) -> None:
    """``t.requires_grad_(flag)``; an inference tensor (made under ``torch.inference_mode()``)
    accepts it only in inference mode."""
    if t.is_inference() and not torch.is_inference_mode_enabled():
        with torch.inference_mode():
            t.requires_grad_(flag)
    else:
        t.requires_grad_(flag)


def _transaction(model: nn.Module, body: Callable[[list[Callable[[], None]]], None]) -> None:
    """Run ``body(undo)``; each step of it first appends to ``undo`` an idempotent action that
    takes the step back (doing nothing if it did not happen). On any exception the actions run
    newest first, with the model's parameter flags restored last, and the exception propagates."""
    frozen = model.__dict__.get(_FROZEN)
    flags = {n: t.requires_grad for n, t in model.named_parameters()}
    undo: list[Callable[[], None]] = []
    try:
        body(undo)
    except BaseException:
        for action in reversed(undo):
            action()
        _restore_flags(model, frozen, flags)
        raise
    if hasattr(model, "_keys_to_ignore_on_save"):  # a transformers model: save_pretrained skips ours
        from ..hf import sync_save_keys

        sync_save_keys(model)


def commit(
    model: nn.Module, p: Plan, extra: Callable[[list[Callable[[], None]]], None] | None = None
) -> nn.Module:
    """Apply a plan atomically: on any exception (an interrupt included) the model is left
    exactly as it was. ``extra(undo)``, when given, runs last inside the same transaction (a
    load installs the adapter's trained module copies there)."""
    first = not hosts(model)

    def body(undo: list[Callable[[], None]]) -> None:
        for e in p.entries:
            _interrupt.checkpoint()
            host = e.host
            before = list(host.patches)
            undo.append(lambda h=host, b=before: h.repatch(b[len(h.patches) :]) if h.patches != b else None)
            undo.append(lambda h=host: h.unpatch_base(p.name, interruptible=False))
            items, active = list(host.adapters.items()), host.active
            undo.append(lambda h=host, i=items, a=active: _restore_adapters(h, i, a))
            host.add_adapter(p.name, e.adapter)
            e.adapter.prepare_base(host, p.name)
        _interrupt.checkpoint()
        if first:
            model.__dict__[_FROZEN] = {n: t.requires_grad for n, t in model.named_parameters()}
            for t in model.parameters():
                t.requires_grad_(False)
        for e in p.entries:
            if e.new_host:
                for k in e.host.base_tensors:
                    t = e.host._parameters.get(k)
                    if t is not None:
                        t.requires_grad_(False)
                original = model.get_submodule(e.path)
                undo.append(lambda path=e.path, m=original: _set_child(model, path, m))
                _set_child(model, e.path, e.host)
                # The host holds the base tensors now; eject hands them back. The original module
                # keeping them too would keep a whole copy alive once a wrapper replaces the host's
                # (fully_shard swaps in row shards).
                for table, k in e.host.base_tensor_slots():
                    undo.append(lambda table=table, k=k, t=table[k]: table.__setitem__(k, t))
                    table[k] = None
        if extra is not None:
            extra(undo)

    _transaction(model, body)
    return model


def inject(
    model: nn.Module,
    variant: str | type[Variant],
    targets: TargetSpec = ALL_LINEAR,
    *,
    name: str = "default",
    config: VariantConfig | None = None,
    dtype: torch.dtype | None = None,
    **hyper: Any,
) -> nn.Module:
    """Add adapter ``name`` of ``variant`` to the layers ``targets`` selects, in place.

    Hyper-parameters come as keywords (``r=16, alpha=32, dropout=0.0``) or as a ``config``
    object (which is never mutated; keywords override its fields). ``dtype`` sets the adapter
    tensors' dtype (default: the base dtype, fp32 for fp16/bf16 bases). Every base parameter is
    frozen. On any error the model is left exactly as it was. Returns ``model``.
    """
    return commit(model, plan(model, variant, targets, name=name, config=config, dtype=dtype, **hyper))


def _set_child(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def eject(model: nn.Module, name: str | None = None) -> nn.Module:
    """Remove adapter ``name`` (default: every adapter). Merged adapters are unmerged and base
    rewrites reverted first, so the original weights come back bit for bit; layers left without
    adapters get their original module object back, and so do modules left without trained
    copies (:func:`lorazoo.modules_to_save`). All or nothing: on any exception (an
    interrupt included) the model is left as it was. Returns ``model``."""
    present = adapter_names(model)
    if not present:
        raise LorazooError("the model has no lorazoo adapters to eject")
    if name is not None and name not in present:
        raise LorazooError(f"no adapter named {name!r} to eject; adapters present: {list(present)}")
    names = list(present) if name is None else [name]
    refuse_sharded(
        model,
        "eject adapters from",
        "eject from the model before sharding it, or from an unsharded copy (lorazoo leaves the "
        "base tensors' state-dict keys as they were)",
    )
    affected = [(p, h) for p, h in hosts(model) if any(n in h.adapters for n in names)]
    # Check everything that could refuse before changing anything.
    for path, host in affected:
        if host.merged is not None:
            host.check_unmerge(exact=True, where=path)
        if name is not None:
            host.check_unpatch(name)

    from ..trained import remove as remove_copies

    def body(undo: list[Callable[[], None]]) -> None:
        remove_copies(model, names, undo)  # whole-module copies the adapters own (modules_to_save)
        for path, host in affected:
            _interrupt.checkpoint()
            state = host.merged
            keep = [n for n in state.names if n not in names] if state is not None else []
            if state is not None:
                undo.append(lambda h=host, s=state: h.remerge(s) if h.merged is None else None)
                host.unmerge()
            before = list(host.patches)
            undo.append(lambda h=host, b=before: h.repatch(b[len(h.patches) :]) if h.patches != b else None)
            for owner in reversed(list(dict.fromkeys(pt.owner for pt in host.patches if pt.owner in names))):
                host.unpatch_base(owner)
            items, active = list(host.adapters.items()), host.active
            undo.append(lambda h=host, i=items, a=active: _restore_adapters(h, i, a))
            for n in names:
                if n in host.adapters:
                    host.remove_adapter(n)
            if keep:
                undo.append(
                    lambda h=host, s=state: (
                        h.unmerge(interruptible=False) if h.merged is not None and h.merged is not s else None
                    )
                )
                host.merge(keep)
            if not host.adapters:
                undo.append(lambda path=path, h=host: _set_child(model, path, h))
                for table, k in host.base_tensor_slots():
                    undo.append(lambda table=table, k=k, t=table[k]: table.__setitem__(k, t))
                host.hand_back()
                _set_child(model, path, host.original)
        _interrupt.checkpoint()
        if not hosts(model):
            flags = model.__dict__.pop(_FROZEN, {})
            for n, t in model.named_parameters():
                if n in flags:
                    _set_grad(t, flags[n])

    _transaction(model, body)
    return model


def iter_adapters(model: nn.Module) -> Iterator[tuple[str, str, Variant]]:
    """``(layer path, adapter name, adapter)`` over the whole model."""
    for path, host in hosts(model):
        for name, adapter in host.adapters.items():
            yield path, name, adapter
