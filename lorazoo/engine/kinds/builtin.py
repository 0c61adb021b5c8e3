"""The plugin that registers lorazoo's built-in layer kinds (entry point ``kinds``)."""

from __future__ import annotations

from ...hookspecs import hookimpl
from . import LayerKind, builtin_kinds


@hookimpl
def lorazoo_layer_kinds() -> list[LayerKind]:
    return builtin_kinds()
