"""Questions about a layer, answered through the registered layer kinds
(:mod:`lorazoo.engine.kinds`), and the host classes under their historical import path."""

from __future__ import annotations

from torch import nn

from ..errors import TargetError
from ..variant import fusable
from .host import AdaptedLayer, owns_output
from .kinds import LayerKind, kind_of, kinds
from .kinds.embedding import AdaptedEmbedding
from .kinds.linear import AdaptedLinear


def layer_kind(module: nn.Module) -> str | None:
    """The kind name variants and adapter files see (``"linear"``, ``"embedding"``: a kind's
    ``adapts_as``) for a layer lorazoo can wrap (or has wrapped), else None."""
    kind = kind_of(module)
    if kind is None or (not isinstance(module, AdaptedLayer) and kind.refusal(module) is not None):
        return None
    return kind.adapts_as


def is_supported(module: nn.Module) -> bool:
    """True for layers lorazoo can wrap (:func:`layer_kind`)."""
    return layer_kind(module) is not None


def is_linear(module: nn.Module) -> bool:
    """A layer of a kind ``"all-linear"`` includes (supported or not), or a host wrapping one."""
    kind = kind_of(module)
    return kind is not None and kind.linear


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a supported layer, seen as a linear map (an embedding maps a one-hot
    row of ``num_embeddings`` entries to ``embedding_dim`` features)."""
    kind = kind_of(module)
    if kind is None:
        raise TargetError(f"{type(module).__name__} is not a layer kind lorazoo knows")
    return kind.dims(module)


def host_for(module: nn.Module) -> AdaptedLayer:
    """A new host for a supported layer."""
    kind = kind_of(module)
    if kind is None:
        raise TargetError(f"{type(module).__name__} is not a layer kind lorazoo knows")
    return kind.wrap(module)


__all__ = [
    "AdaptedEmbedding",
    "AdaptedLayer",
    "AdaptedLinear",
    "LayerKind",
    "fusable",
    "host_for",
    "is_linear",
    "is_supported",
    "kinds",
    "layer_dims",
    "layer_kind",
    "owns_output",
]
