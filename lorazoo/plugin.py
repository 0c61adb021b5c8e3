"""What a variant plugin may use: the one public module for plugin authors.

A plugin module imports ``lorazoo`` (and, for paper claims, ``lorazoo.claims``) and the names
below; nothing under ``lorazoo.engine`` and no ``_``-prefixed name. The built-in variants are
held to the same rule, so whatever they need is here.

Building blocks (also exported from ``lorazoo``): :class:`Variant`, :class:`VariantConfig`,
:class:`LowRankAdapter`, :class:`LowRank`, :class:`LayerInfo`, :class:`StepInfo`,
:data:`hookimpl`, :func:`register`, :func:`unregister`.

Helpers defined here:

* :func:`accumulation_dtype`: the dtype the engine merges a weight in, for variants that compute
  with the base weight (DoRA's row norms, OLoRA's base rewrite) and must round as the merge does;
* :func:`tensor_version`: a tensor's in-place version counter, to key caches on;
* :func:`adapted_layers`, :func:`adapters_named`, :func:`iter_adapters`: the adapted layers
  (hosts) of a model and the adapters on them, for module-level functions that work on a whole
  model (OLoRA's ``to_lora``, AdaLoRA's ``ranks``);
* :data:`NF4_BLOCK`: the block size (64) of lorazoo's NF4 base storage, for variants whose
  config records a base recipe (QLoRA's ``block_size``).

The host handed to ``forward``, ``output`` and ``prepare_base`` is a :class:`AdaptedLinear` (or
:class:`AdaptedEmbedding`). Its public members a variant may use: ``weight`` and ``bias`` (the
base layer's own parameters), ``in_features``/``out_features``, ``adapters`` (name → adapter),
``active`` (names of the active adapters), ``merged`` (``None`` or the merge state, whose
``names`` are the merged adapters), ``set_active(names)``, and ``patch_base(name, B, A)`` /
``check_unpatch(name)`` for reversible base rewrites (see ``docs/interface.md``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .engine import AdaptedEmbedding, AdaptedLinear
from .engine.exact import acc_dtype as _acc_dtype
from .engine.exact import version as _version
from .engine.inject import adapters_named as _adapters_named
from .engine.inject import hosts as _hosts
from .engine.inject import iter_adapters as _iter_adapters
from .hookspecs import hookimpl
from .quant.nf4 import BLOCK as NF4_BLOCK
from .registry import register, unregister
from .variant import LayerInfo, LowRank, LowRankAdapter, StepInfo, Variant, VariantConfig

__all__ = [
    "AdaptedEmbedding",
    "AdaptedLinear",
    "LayerInfo",
    "LowRank",
    "LowRankAdapter",
    "NF4_BLOCK",
    "StepInfo",
    "Variant",
    "VariantConfig",
    "accumulation_dtype",
    "adapted_layers",
    "adapters_named",
    "hookimpl",
    "iter_adapters",
    "register",
    "tensor_version",
    "unregister",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the engine forms merges of a ``dtype`` weight in: ``torch.float64`` for an fp64
    weight, ``torch.float32`` for every other (fp32, bf16, fp16).

    A variant that computes from the base weight what the merge will also compute (a row norm,
    a rewrite of ``W`` through ``host.patch_base``) does it in this dtype, so both round alike.
    """
    return _acc_dtype(dtype)


def tensor_version(t: Tensor) -> int | None:
    """``t``'s in-place version counter (every ``copy_``, optimizer step or other in-place
    change bumps it), or ``None`` for an inference-mode tensor, which has none.

    Together with ``t.data_ptr()`` it keys a cache of values derived from ``t`` (DoRA caches
    ``‖W_i‖²`` this way). ``None`` means "unknown": recompute rather than reuse.
    """
    return _version(t)


def adapted_layers(model: nn.Module) -> list[tuple[str, AdaptedLinear]]:
    """``(path, host)`` for every adapted layer of ``model``, in ``named_modules()`` order."""
    return _hosts(model)


def adapters_named(model: nn.Module, name: str) -> list[tuple[str, AdaptedLinear, Variant]]:
    """``(path, host, adapter)`` for every layer of ``model`` that carries adapter ``name``.

    Raises :class:`lorazoo.LorazooError` naming the adapters present when no layer carries it.
    """
    return _adapters_named(model, name)


def iter_adapters(model: nn.Module) -> Iterator[tuple[str, str, Variant]]:
    """``(layer path, adapter name, adapter)`` for every adapter of ``model``."""
    return _iter_adapters(model)
