"""pluggy hook specifications of the ``lorazoo`` plugin system.

A plugin is any module or object with functions marked ``@lorazoo.hookimpl``. Installed
distributions expose plugins through the entry-point group ``lorazoo``.

A marked function must be named after one of the hooks below and take only arguments its hook
passes; the registry reports any other (a misspelling pluggy alone would ignore) with the plugin's
name and the known hooks. Mark a function ``@lorazoo.hookimpl(optionalhook=True)`` when it is
meant for a hook this lorazoo version may not define.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .engine.kinds import LayerKind
    from .variant import Variant

PROJECT = "lorazoo"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class VariantSpec:
    """Hooks a variant plugin implements."""

    @hookspec
    def lorazoo_variants(self) -> list[type[Variant]]:  # type: ignore[empty-body]
        """Return the :class:`lorazoo.Variant` subclasses this plugin provides.

        Each class must carry a unique, non-empty ``name``.
        """


class LayerKindSpec:
    """Hooks a layer-kind plugin implements."""

    @hookspec
    def lorazoo_layer_kinds(self) -> list[LayerKind]:  # type: ignore[empty-body]
        """Return the :class:`lorazoo.LayerKind` instances this plugin provides.

        Each must carry a unique, non-empty ``name``.
        """
