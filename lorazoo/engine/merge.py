"""merge / unmerge over a whole model.

Per layer, the active adapters are folded into the weight in one step: ``ΔW`` of every adapter
is computed from the pre-merge weight (docs/spec/variants.md R2), summed in fp32 (fp64 for an fp64 base) and
cast once (R3). The weight comes back bit for bit on unmerge, from about one byte per element
recorded at merge time (``engine/exact.py``), never a copy of the weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..errors import LorazooError, MergeError
from .distributed import reshard
from .inject import adapter_names, hosts


@dataclass(frozen=True)
class MergeReport:
    """What a merge holds to make the unmerge exact."""

    layers: int
    elements: int
    bytes_held: int
    wide_elements: int  # elements kept as full bit patterns (|W| ≪ |ΔW|)

    @property
    def bytes_per_element(self) -> float:
        return self.bytes_held / max(1, self.elements)


def merge(model: nn.Module, names: str | Sequence[str] | None = None) -> nn.Module:
    """Fold the active adapters (or ``names``) into the base weights. Returns ``model``."""
    present = adapter_names(model)
    if not present:
        raise LorazooError("the model has no lorazoo adapters to merge")
    wanted = [names] if isinstance(names, str) else list(names) if names is not None else None
    if wanted is not None:
        unknown = [n for n in wanted if n not in present]
        if unknown:
            raise LorazooError(f"no adapter named {unknown}; adapters present: {list(present)}")
    todo = []
    for path, host in hosts(model):
        sel = [n for n in (wanted if wanted is not None else host.active) if n in host.adapters]
        if not sel:
            continue
        if host.merged is not None:
            raise MergeError(
                f"layer {path!r} already has {list(host.merged.names)} merged; merging twice "
                "would apply them twice: call lorazoo.unmerge(model) first"
            )
        todo.append((path, host, sel))
    if not todo:
        raise MergeError("no active adapter to merge; activate one with lorazoo.set_active")
    reshard(model)  # FSDP2: write into the shards, not into whole copies about to be dropped
    done = []
    try:
        for _path, host, sel in todo:
            host.merge(sel)
            done.append(host)
    except BaseException:
        for host in reversed(done):
            host.unmerge()
        raise
    return model


def unmerge(model: nn.Module, exact: bool = True) -> nn.Module:
    """Take merged adapters back out; the base weights come back bit for bit.

    ``exact=False`` allows plain subtraction on layers whose adapter or base tensors changed
    while merged (those come back within rounding); with ``exact=True`` such a layer is an
    error and nothing is changed. Returns ``model``.
    """
    merged = [(p, h) for p, h in hosts(model) if h.merged is not None]
    if not merged:
        raise MergeError("nothing is merged: call lorazoo.merge(model) first")
    reshard(model)
    for path, host in merged:
        host.check_unmerge(exact, where=f"layer {path!r}")
    for _, host in merged:
        host.unmerge(exact)
    return model


def merge_report(model: nn.Module) -> MergeReport:
    """Bytes currently held for exact unmerge, over every merged layer."""
    layers = elements = held = wide = 0
    for _, host in hosts(model):
        if host.merged is None:
            continue
        layers += 1
        elements += host.merged.residual.numel  # sharded (FSDP2): this process's rows
        held += host.merged.residual.nbytes
        wide += host.merged.residual.n_wide
    return MergeReport(layers, elements, held, wide)
