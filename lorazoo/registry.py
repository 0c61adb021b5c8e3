"""The plugin registry: a pluggy ``PluginManager`` fed from the ``lorazoo`` entry-point group.

Built-in variants and layer kinds are ordinary plugins: they are found through the same entry
points a third-party package declares. Plugins are loaded lazily, on the first lookup, and can
also be registered in-process with :func:`register` (notebooks, tests).
"""

from __future__ import annotations

import threading
import warnings
from importlib import metadata
from typing import Any

import pluggy

from .errors import PluginError, PluginLoadWarning, UnknownVariantError, closest
from .hookspecs import PROJECT, LayerKindSpec, VariantSpec
from .variant import Variant, VariantConfig

ENTRY_POINT_GROUP = "lorazoo"

_lock = threading.RLock()
_manager: pluggy.PluginManager | None = None
_table: dict[str, tuple[type[Variant], str]] | None = None  # name -> (class, plugin label)
_kinds: dict[str, tuple[Any, str]] | None = None  # layer kind name -> (kind, plugin label)


def _entry_points() -> list[metadata.EntryPoint]:
    eps = metadata.entry_points()
    selected = (
        eps.select(group=ENTRY_POINT_GROUP) if hasattr(eps, "select") else eps.get(ENTRY_POINT_GROUP, [])
    )
    # One distribution can be seen twice (e.g. an editable install plus a path entry).
    seen: dict[tuple[str, str], metadata.EntryPoint] = {}
    for ep in selected:
        seen.setdefault((ep.name, ep.value), ep)
    return sorted(seen.values(), key=lambda ep: (ep.name, ep.value))


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(VariantSpec)
    pm.add_hookspecs(LayerKindSpec)
    for ep in _entry_points():
        label = f"{ep.name} ({ep.value})"
        if pm.get_plugin(label) is not None:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            warnings.warn(
                f"lorazoo plugin {label!r} failed to import and is skipped: {type(exc).__name__}: {exc}",
                PluginLoadWarning,
                stacklevel=3,
            )
            continue
        pm.register(plugin, name=label)
    return pm


def manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (entry points are loaded on first use)."""
    global _manager
    with _lock:
        if _manager is None:
            _manager = _new_manager()
        return _manager


def _check_class(cls: Any, label: str) -> type[Variant]:
    if not (isinstance(cls, type) and issubclass(cls, Variant)):
        raise PluginError(f"plugin {label!r} returned {cls!r}, which is not a lorazoo.Variant subclass")
    if not isinstance(cls.name, str) or not cls.name:
        raise PluginError(f"variant class {cls.__qualname__} from plugin {label!r} has no name")
    if not (isinstance(cls.config_class, type) and issubclass(cls.config_class, VariantConfig)):
        raise PluginError(f"variant {cls.name!r}: config_class must subclass lorazoo.VariantConfig")
    return cls


def _build_table() -> dict[str, tuple[type[Variant], str]]:
    pm = manager()
    table: dict[str, tuple[type[Variant], str]] = {}
    for impl in pm.hook.lorazoo_variants.get_hookimpls():
        label = pm.get_name(impl.plugin) or repr(impl.plugin)
        try:
            provided = impl.function()
        except Exception as exc:
            warnings.warn(
                f"lorazoo plugin {label!r} failed while listing its variants and is skipped: "
                f"{type(exc).__name__}: {exc}",
                PluginLoadWarning,
                stacklevel=3,
            )
            continue
        for cls in provided or ():
            cls = _check_class(cls, label)
            if cls.name in table and table[cls.name][0] is not cls:
                other = table[cls.name][1]
                raise PluginError(
                    f"variant name {cls.name!r} is registered twice: by plugin {other!r} and by "
                    f"plugin {label!r}; uninstall one of them or give one variant another name"
                )
            table[cls.name] = (cls, label)
    return table


def _check_kind(kind: Any, label: str) -> Any:
    from .engine.host import AdaptedLayer
    from .engine.kinds import LayerKind

    if isinstance(kind, type) and issubclass(kind, LayerKind):
        kind = kind()
    if not isinstance(kind, LayerKind):
        raise PluginError(f"plugin {label!r} returned {kind!r}, which is not a lorazoo.LayerKind")
    if not isinstance(kind.name, str) or not kind.name:
        raise PluginError(f"layer kind {type(kind).__qualname__} from plugin {label!r} has no name")
    host = getattr(kind, "host_class", None)
    if not (isinstance(host, type) and issubclass(host, AdaptedLayer)):
        raise PluginError(
            f"layer kind {kind.name!r} from plugin {label!r}: host_class must subclass lorazoo.AdaptedLayer"
        )
    return kind


def _build_kinds() -> dict[str, tuple[Any, str]]:
    pm = manager()
    table: dict[str, tuple[Any, str]] = {}
    # pluggy lists implementations oldest first; kinds are looked up in that order
    for impl in pm.hook.lorazoo_layer_kinds.get_hookimpls():
        label = pm.get_name(impl.plugin) or repr(impl.plugin)
        try:
            provided = impl.function()
        except Exception as exc:
            warnings.warn(
                f"lorazoo plugin {label!r} failed while listing its layer kinds and is skipped: "
                f"{type(exc).__name__}: {exc}",
                PluginLoadWarning,
                stacklevel=3,
            )
            continue
        for kind in provided or ():
            kind = _check_kind(kind, label)
            if kind.name in table:
                other = table[kind.name][1]
                raise PluginError(
                    f"layer kind {kind.name!r} is registered twice: by plugin {other!r} and by "
                    f"plugin {label!r}; uninstall one of them or give one kind another name"
                )
            table[kind.name] = (kind, label)
    return table


def layer_kinds() -> list[Any]:
    """Every registered :class:`lorazoo.LayerKind`, in lookup order."""
    global _kinds
    with _lock:
        if _kinds is None:
            manager()
            _kinds = _build_kinds()
        return [k for k, _ in _kinds.values()]


def layer_kind_named(name: str) -> Any:
    """The registered layer kind called ``name``."""
    for kind in layer_kinds():
        if kind.name == name:
            return kind
    known = [k.name for k in layer_kinds()]
    near = closest(str(name), known)
    hint = f" Did you mean {near!r}?" if near else ""
    raise PluginError(f"unknown layer kind {name!r}.{hint} Known layer kinds: {', '.join(known)}")


def _lookup() -> dict[str, tuple[type[Variant], str]]:
    global _table
    with _lock:
        if _table is None:
            _table = _build_table()
        return _table


def variants() -> list[str]:
    """Sorted names of every registered variant."""
    return sorted(_lookup())


def variant(name: str) -> type[Variant]:
    """The registered class for ``name``."""
    if isinstance(name, type) and issubclass(name, Variant):
        return name
    table = _lookup()
    if name not in table:
        near = closest(str(name), table)
        hint = f" Did you mean {near!r}?" if near else ""
        known = ", ".join(sorted(table)) or "(none: is lorazoo installed with its entry points?)"
        raise UnknownVariantError(f"unknown variant {name!r}.{hint} Known variants: {known}")
    return table[name][0]


def plugin_of(name: str) -> str:
    """The label of the plugin that registered ``name`` (for messages and reports)."""
    variant(name)
    return _lookup()[name][1]


def register(plugin: object, name: str | None = None) -> None:
    """Register an in-process plugin (an object or module with ``@hookimpl`` functions)."""
    global _table, _kinds
    with _lock:
        pm = manager()
        pm.register(plugin, name=name)
        _table = _kinds = None
        try:
            _lookup()
            layer_kinds()
        except Exception:
            pm.unregister(plugin)
            _table = _kinds = None
            raise


def unregister(plugin: object) -> None:
    """Remove a plugin registered with :func:`register`."""
    global _table, _kinds
    with _lock:
        manager().unregister(plugin)
        _table = _kinds = None


def reload() -> None:
    """Forget loaded plugins; the next lookup reads the entry points again."""
    global _manager, _table, _kinds
    with _lock:
        _manager = None
        _table = _kinds = None
