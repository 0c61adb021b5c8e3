"""inject / eject, atomic over the whole model.

Injection is planned first (targets resolved, every adapter built) without touching the model;
only a complete plan is committed. A failure while committing (a variant's base preparation)
rolls back what was done, so the model is either fully adapted or exactly as it was.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import registry
from ..errors import ConfigError, LorazooError, MergeError
from ..variant import LayerInfo, Variant, VariantConfig
from .distributed import refuse_sharded
from .layer import AdaptedLinear, host_for, layer_dims, layer_kind
from .targets import ALL_LINEAR, TargetSpec, resolve

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_FROZEN = "_lorazoo_frozen"  # model attribute: requires_grad of every parameter before injection


def hosts(model: nn.Module) -> list[tuple[str, AdaptedLinear]]:
    """Every adapted layer of ``model`` with its path."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]


def adapter_names(model: nn.Module) -> dict[str, str]:
    """``{adapter name: variant name}`` for every adapter in ``model``, in injection order."""
    out: dict[str, str] = {}
    for _, host in hosts(model):
        for name, adapter in host.adapters.items():
            out.setdefault(name, type(adapter).name)
    return out


def adapters_named(model: nn.Module, name: str) -> list[tuple[str, AdaptedLinear, Variant]]:
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
    host: AdaptedLinear
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
    layers: list[LayerInfo] = []
    for path, module in matches:
        if isinstance(module, AdaptedLinear) and module.merged is not None:
            raise MergeError(f"layer {path!r} has merged adapters; unmerge before injecting more")
        weight = module.weight
        kind = layer_kind(module)
        d_out, d_in = layer_dims(module)
        layers.append(
            LayerInfo(
                path=path,
                d_in=d_in,
                d_out=d_out,
                weight=weight.detach().t() if kind == "embedding" else weight.detach(),
                has_bias=getattr(module, "bias", None) is not None,
                adapter_dtype=dtype or default_adapter_dtype(weight.dtype),
                kind=kind or "linear",
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
    shared = cls.shared_state(cfg, layers)
    entries = []
    for (path, module), layer in zip(matches, layers, strict=False):
        new = not isinstance(module, AdaptedLinear)
        host = host_for(module) if new else module
        entries.append(_Entry(path, host, new, cls(layer, cfg, shared)))
    return Plan(name, cls, cfg, entries, shared)


def commit(model: nn.Module, p: Plan) -> nn.Module:
    """Apply a plan atomically."""
    first = not hosts(model)
    done: list[_Entry] = []
    try:
        for e in p.entries:
            e.host.add_adapter(p.name, e.adapter)
            done.append(e)
            e.adapter.prepare_base(e.host, p.name)
    except BaseException:
        for e in reversed(done):
            e.host.unpatch_base(p.name)
            e.host.remove_adapter(p.name)
        raise
    if first:
        model.__dict__[_FROZEN] = {n: t.requires_grad for n, t in model.named_parameters()}
        for t in model.parameters():
            t.requires_grad_(False)
    for e in p.entries:
        if e.new_host:
            e.host.weight.requires_grad_(False)
            if e.host.bias is not None:
                e.host.bias.requires_grad_(False)
            _set_child(model, e.path, e.host)
            # The host holds the base tensors now; eject hands them back. The original module
            # keeping them too would keep a whole copy alive once a wrapper replaces the host's
            # (fully_shard swaps in row shards).
            e.host.original._parameters.update(
                {k: None for k in ("weight", "bias") if k in e.host.original._parameters}
            )
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
    adapters get their original module object back. Returns ``model``."""
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
    for path, host in affected:
        if host.merged is not None:
            keep = [n for n in host.merged.names if n not in names]
            host.unmerge()
        else:
            keep = []
        for owner in reversed([pt.owner for pt in host.patches if pt.owner in names]):
            host.unpatch_base(owner)
        for n in names:
            if n in host.adapters:
                host.remove_adapter(n)
        if keep:
            host.merge(keep)
        if not host.adapters:
            original = host.original
            original.weight = host.weight
            original.bias = host.bias
            _set_child(model, path, original)
    if not hosts(model):
        flags = model.__dict__.pop(_FROZEN, {})
        for n, t in model.named_parameters():
            if n in flags:
                t.requires_grad_(flags[n])
    return model


def iter_adapters(model: nn.Module) -> Iterator[tuple[str, str, Variant]]:
    """``(layer path, adapter name, adapter)`` over the whole model."""
    for path, host in hosts(model):
        for name, adapter in host.adapters.items():
            yield path, name, adapter
