"""Exception and warning classes. Every error lorazoo raises derives from :class:`LorazooError`."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LorazooError(Exception):
    """Base class of every error raised by lorazoo."""


class UnknownVariantError(LorazooError, KeyError):
    """A variant name that no installed plugin registers."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ConfigError(LorazooError, ValueError):
    """A hyper-parameter that is out of range, of the wrong type, or unknown."""


class TargetError(LorazooError, ValueError):
    """Target selection matched nothing, or matched a layer that cannot be adapted."""


class PluginError(LorazooError):
    """A plugin is malformed, or two plugins register the same variant name."""


class MergeError(LorazooError, RuntimeError):
    """Merge or unmerge asked for in a state where it is not possible or not exact."""


class RoutingError(LorazooError, ValueError):
    """A routed batch whose rows do not match the input, or name adapters the model lacks."""


class AdapterFileError(LorazooError, ValueError):
    """An adapter file that is corrupt, truncated, or made for another model or variant."""


class UnknownAdapterVariantError(AdapterFileError, UnknownVariantError):
    """An adapter file names a variant that no installed plugin registers."""


class PluginLoadWarning(UserWarning):
    """An installed plugin failed to load (to import, or its hooks or variants are malformed)
    and is skipped; every other variant still works."""


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate that looks most like ``name``, or None when nothing is close."""
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return found[0] if found else None
