"""The plugin registry: a pluggy ``PluginManager`` fed from the ``lorazoo`` entry-point group.

Built-in variants and layer kinds are ordinary plugins: they are found through the same entry
points a third-party package declares. Plugins are loaded lazily, on the first lookup, and can
also be registered in-process with :func:`register` (notebooks, tests).

A broken installed plugin never takes the others down. One that fails to import, implements a
hook lorazoo does not define (a misspelled ``lorazoo_variants``: pluggy alone would ignore it),
implements none, takes arguments its hook does not pass, or lists something that is not a
variant is skipped with a :class:`~lorazoo.PluginLoadWarning` naming it and the reason; asking
for its variant then raises :class:`~lorazoo.UnknownVariantError` with that reason. The same
faults in a plugin handed to :func:`register` raise :class:`~lorazoo.PluginError`, with nothing
registered. Several entry points naming one module load it once. Two plugins giving the same
variant name remain an error on every lookup: which one was meant cannot be guessed.
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
_skipped: dict[str, str] = {}  # entry-point plugin label -> why it was skipped
_in_process: set[str] = set()  # labels of plugins added by register()
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


def _new_manager() -> tuple[pluggy.PluginManager, dict[str, str]]:
    """A manager with every entry-point plugin that loads cleanly, and ``{label: why}`` for the
    ones skipped (each also warned about): a broken plugin must not take the others down."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(VariantSpec)
    pm.add_hookspecs(LayerKindSpec)
    skipped: dict[str, str] = {}
    for ep in _entry_points():
        label = f"{ep.name} ({ep.value})"
        if pm.get_plugin(label) is not None:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            _skip(skipped, label, f"failed to import: {type(exc).__name__}: {exc}")
            continue
        if pm.get_name(plugin) is not None:
            # Another entry point (of this or another distribution) names the same module or
            # object: it is loaded once, under the first label.
            continue
        try:
            _register_checked(pm, plugin, label)
        except PluginError as exc:
            _skip(skipped, label, str(exc))
    return pm, skipped


def _skip(skipped: dict[str, str], label: str, why: str) -> None:
    why = why.removeprefix(f"plugin {label!r}").lstrip(": ")
    skipped[label] = why
    warnings.warn(
        f"lorazoo plugin {label!r} is skipped (every other variant still works): {why}",
        PluginLoadWarning,
        stacklevel=4,
    )


def known_hooks(pm: pluggy.PluginManager | None = None) -> list[str]:
    """Names of the hooks lorazoo defines (the functions a plugin may mark ``@lorazoo.hookimpl``)."""
    pm = pm or manager()
    return sorted(name for name, caller in vars(pm.hook).items() if caller.has_spec())


def _signatures(pm: pluggy.PluginManager) -> str:
    """``lorazoo_variants(), ...``: each known hook with the arguments it passes."""
    hooks = []
    for name in known_hooks(pm):
        spec = getattr(pm.hook, name).spec
        hooks.append(f"{name}({', '.join(spec.argnames) if spec is not None else ''})")
    return ", ".join(hooks)


def _register_checked(pm: pluggy.PluginManager, plugin: object, label: str) -> None:
    """Register ``plugin`` under ``label``, or raise :class:`PluginError` (leaving ``pm`` as it
    was) when it is already registered, implements a hook lorazoo does not define (a misspelled
    name: pluggy would otherwise ignore it), or implements none at all."""
    hooks = _signatures(pm)
    if pm.get_name(plugin) is not None:
        raise PluginError(
            f"plugin {label!r} is already registered as {pm.get_name(plugin)!r}; "
            "call lorazoo.unregister on it first to register it again"
        )
    if pm.get_plugin(label) is not None:
        raise PluginError(f"a plugin named {label!r} is already registered; pass another name")
    try:
        pm.register(plugin, name=label)
    except pluggy.PluginValidationError as exc:
        detail = " ".join(str(exc).split())  # pluggy's message spans lines
        raise PluginError(
            f"plugin {label!r} has a hook implementation lorazoo cannot call ({detail}); a hook "
            f"implementation may take only the arguments its hook passes. Known hooks: {hooks}"
        ) from None
    unknown = sorted(
        {
            caller.name
            for caller in pm.get_hookcallers(plugin) or ()
            if not caller.has_spec()
            for impl in caller.get_hookimpls()
            if impl.plugin is plugin and not impl.optionalhook
        }
    )
    if unknown or not pm.get_hookcallers(plugin):
        pm.unregister(plugin)
        if unknown:
            hints = []
            for name in unknown:
                near = closest(name, known_hooks(pm))
                hints.append(f"{name!r}" + (f" (did you mean {near!r}?)" if near else ""))
            why = (
                f"implements {', '.join(hints)}, which lorazoo does not define. Known hooks: {hooks}. "
                "Rename the function, or mark it @lorazoo.hookimpl(optionalhook=True) if it is meant "
                "for another lorazoo version"
            )
        else:
            why = f"has no function marked @lorazoo.hookimpl, so it provides nothing. Known hooks: {hooks}"
        raise PluginError(f"plugin {label!r} {why}")


def manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (entry points are loaded on first use)."""
    global _manager, _skipped
    with _lock:
        if _manager is None:
            _manager, _skipped = _new_manager()
        return _manager


def skipped() -> dict[str, str]:
    """``{plugin label: why}`` for the installed plugins that were skipped (they failed to
    import, or are malformed); each was reported once with a :class:`PluginLoadWarning`."""
    with _lock:
        manager()
        return dict(_skipped)


def _check_class(cls: Any, label: str) -> type[Variant]:
    if not (isinstance(cls, type) and issubclass(cls, Variant)):
        raise PluginError(f"plugin {label!r} returned {cls!r}, which is not a lorazoo.Variant subclass")
    if not isinstance(cls.name, str) or not cls.name:
        raise PluginError(f"variant class {cls.__qualname__} from plugin {label!r} has no name")
    if not (isinstance(cls.config_class, type) and issubclass(cls.config_class, VariantConfig)):
        raise PluginError(f"variant {cls.name!r}: config_class must subclass lorazoo.VariantConfig")
    return cls


def _listed(impl: Any, label: str) -> list[type[Variant]]:
    """The variant classes one plugin's ``lorazoo_variants`` returns, checked."""
    try:
        provided = impl.function()
    except Exception as exc:
        raise PluginError(
            f"plugin {label!r} failed while listing its variants: {type(exc).__name__}: {exc}"
        ) from exc
    if provided is None:
        return []
    if isinstance(provided, (str, bytes)) or not hasattr(provided, "__iter__"):
        raise PluginError(
            f"plugin {label!r}: lorazoo_variants returned {provided!r}; return a list of lorazoo.Variant "
            "subclasses"
        )
    return [_check_class(cls, label) for cls in provided]


def _build_table() -> dict[str, tuple[type[Variant], str]]:
    pm = manager()
    table: dict[str, tuple[type[Variant], str]] = {}
    for impl in pm.hook.lorazoo_variants.get_hookimpls():
        label = pm.get_name(impl.plugin) or repr(impl.plugin)
        try:
            provided = _listed(impl, label)
        except PluginError as exc:
            if label in _in_process:  # its author is the caller of register(): tell them now
                raise
            # An installed plugin: skip it for good, keep every other variant working.
            pm.unregister(impl.plugin)
            _skip(_skipped, label, str(exc))
            continue
        for cls in provided:
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
        broken = skipped()
        # The entry-point name is, by convention, the variant's: say so when that one is broken.
        mine = [label for label in broken if label.split(" ", 1)[0] == name]
        if mine:
            hint = f" The plugin {mine[0]!r} that would provide it was skipped: {broken[mine[0]]}."
        elif broken:
            hint += f" Skipped plugins: {'; '.join(f'{k!r}: {v}' for k, v in broken.items())}."
        raise UnknownVariantError(f"unknown variant {name!r}.{hint} Known variants: {known}")
    return table[name][0]


def plugin_of(name: str) -> str:
    """The label of the plugin that registered ``name`` (for messages and reports)."""
    variant(name)
    return _lookup()[name][1]


def register(plugin: object, name: str | None = None) -> None:
    """Register an in-process plugin: an object or module with functions marked
    ``@lorazoo.hookimpl``, as an entry point would name it (notebooks, tests, applications that
    define a variant of their own). Its variants are usable at once.

    All or nothing: raises :class:`PluginError`, with nothing registered, when the plugin (or
    ``name``) is already registered, implements a hook lorazoo does not define (a misspelled
    ``lorazoo_variants``), implements none, or lists something that is not a valid variant or a
    name another plugin already has.
    """
    global _table, _kinds
    with _lock:
        pm = manager()
        label = name if name is not None else pm.get_canonical_name(plugin)
        _register_checked(pm, plugin, label)
        _in_process.add(label)
        _table = _kinds = None
        try:
            _lookup()
            layer_kinds()
        except BaseException:
            pm.unregister(plugin)
            _in_process.discard(label)
            _table = _kinds = None
            raise


def unregister(plugin: object) -> None:
    """Remove a plugin registered with :func:`register`."""
    global _table, _kinds
    with _lock:
        pm = manager()
        label = pm.get_name(plugin)
        if label is None:
            raise PluginError(f"{plugin!r} is not a registered lorazoo plugin; nothing was unregistered")
        pm.unregister(plugin)
        _in_process.discard(label)
        _table = _kinds = None


def reload() -> None:
    """Forget loaded plugins; the next lookup reads the entry points again."""
    global _manager, _table, _kinds
    with _lock:
        _manager = None
        _table = _kinds = None
        _in_process.clear()
