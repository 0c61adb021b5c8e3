"""merge / unmerge over a whole model.

Per layer, the active adapters are folded into the weight in one step: ``ΔW`` of every adapter
is computed from the pre-merge weight (docs/spec/variants.md R2), summed in fp32 (fp64 for an fp64
base) and cast once (R3). The weight comes back bit for bit on unmerge, from about one byte per
element recorded at merge time (``engine/exact.py``) and the merged factors, never a copy of the
weight.

A weight shared with another parameter (an embedding tied to the output head) is never merged
into: both layers would change. Every operation here is all or nothing, also when interrupted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..errors import LorazooError, MergeError
from . import _interrupt
from .distributed import reshard
from .host import AdaptedLayer
from .inject import adapter_names, hosts, tied_elsewhere


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


def refuse_ties(model: nn.Module, pairs: Sequence[tuple[str, AdaptedLayer]], what: str) -> None:
    """Raise :class:`MergeError` naming the tie if any of ``pairs`` has a weight shared with
    another parameter of ``model``."""
    ties = tied_elsewhere(model, pairs)
    if ties:
        path, others = next(iter(ties.items()))
        raise MergeError(
            f"the weight of layer {path!r} is tied to {others} (one tensor shared by both), so "
            f"{what} would change {others} as well. Keep that adapter unmerged (its unmerged "
            "forward is correct), leave the layer out of the targets, or untie the weights first "
            "(give one layer its own copy)"
        )


def merge(model: nn.Module, names: str | Sequence[str] | None = None) -> nn.Module:
    """Fold the active adapters (or ``names``) into the base weights. Returns ``model``.

    All or nothing: on any exception (an interrupt between two layers or two row chunks
    included) every layer is left unmerged, with its weight bit for bit as before."""
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
    refuse_ties(model, [(p, h) for p, h, _ in todo], "merging into it")
    try:
        for _path, host, sel in todo:
            _interrupt.checkpoint()
            host.merge(sel)
        _interrupt.checkpoint()
    except BaseException:
        for _path, host, _sel in reversed(todo):
            if host.merged is not None:  # none was merged before
                host.unmerge(interruptible=False)
        raise
    return model


def unmerge(model: nn.Module, exact: bool = True) -> nn.Module:
    """Take merged adapters back out; the base weights come back bit for bit.

    The update is reverted as it was merged, so adapters trained while merged do not matter.
    ``exact=False`` allows layers whose *base weight* changed while merged: there the merged
    update is subtracted from the weight as it is now (the change is kept, the rest comes back
    within rounding); with ``exact=True`` such a layer is an error and nothing is changed. All
    or nothing, also when interrupted (except that a layer unmerged by that subtraction stays
    unmerged: it cannot be merged back bit for bit). Returns ``model``."""
    merged = [(p, h) for p, h in hosts(model) if h.merged is not None]
    if not merged:
        raise MergeError("nothing is merged: call lorazoo.merge(model) first")
    reshard(model)
    for path, host in merged:
        host.check_unmerge(exact, where=f"layer {path!r}")
    states = {id(h): h.merged for _, h in merged}
    # layers whose weight changed while merged (exact=False): their arithmetic unmerge cannot be
    # re-done exactly, so a rollback leaves those unmerged
    arith = {id(h) for _, h in merged if not exact and h._changed_while_merged()}
    try:
        for _, host in merged:
            _interrupt.checkpoint()
            host.unmerge(exact)
        _interrupt.checkpoint()
    except BaseException:
        for _, host in reversed(merged):
            state = states[id(host)]
            if host.merged is None and state is not None and id(host) not in arith:
                host.remerge(state)
        raise
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
