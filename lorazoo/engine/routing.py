"""Mixed batches: rows of one batch through different adapters, in one forward.

Serving many tasks from one base means batches whose rows belong to different tasks. Merging
cannot serve them (the weights hold one task at a time), and running the batch once per adapter
repeats the base computation. :func:`route` runs the base layer once on the whole batch and
adds each adapter's contribution on its own rows only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..errors import MergeError, RoutingError, closest
from .inject import adapter_names, hosts


@contextlib.contextmanager
def route(model: nn.Module, rows: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row ``i`` of every batch runs through adapter ``rows[i]`` alone
    (``None``: the base model), whatever adapters are active.

    ``rows`` has one entry per batch row: the first dimension of every adapted layer's input
    (token ids for an embedding) must equal ``len(rows)``. A layer that does not carry the
    adapter a row names gives that row the base output, as it would with that adapter active.
    Each adapter's contribution is computed once, on its rows only (a batch sorted by adapter
    is routed through slices, without gathering rows); gradients flow as usual,
    so a mixed batch can also be trained on. Merged adapters cannot be routed (their update is
    in the weights for every row): unmerge first. Merging inside the block is refused, and
    blocks do not nest.

    Example::

        with lorazoo.route(model, ["task_a", "task_b", None, "task_a"]):
            logits = model(ids)  # ids: 4 rows
    """
    names = list(rows)
    if not names:
        raise RoutingError("route needs one adapter name (or None) per batch row; got an empty list")
    present = adapter_names(model)
    if not present:
        raise RoutingError("the model has no lorazoo adapters to route rows to")
    for i, n in enumerate(names):
        if n is None:
            continue
        if not isinstance(n, str) or n not in present:
            near = closest(str(n), present)
            hint = f"; did you mean {near!r}?" if near else ""
            raise RoutingError(
                f"row {i} names adapter {n!r}, which the model does not have; adapters present: "
                f"{list(present)} (use None for the base model){hint}"
            )
    layers = hosts(model)
    merged = [p for p, h in layers if h.merged is not None]
    if merged:
        more = " ..." if len(merged) > 3 else ""
        raise MergeError(
            f"cannot route a batch while adapters are merged (into {merged[:3]}{more}); call "
            "lorazoo.unmerge(model) first"
        )
    from ..trained import trained_modules

    saved = trained_modules(model)
    if saved:
        raise RoutingError(
            f"cannot route a batch through a model with modules saved whole ({sorted(saved)[:3]}): such "
            "a module runs one adapter's copy for the whole batch; run each adapter's rows as their own "
            "batch with lorazoo.set_active instead"
        )
    if any(h._routes is not None for _, h in layers):
        raise RoutingError("a batch is already routed; lorazoo.route blocks do not nest")
    device = next((t.device for _, h in layers for t in h.adapters.parameters()), torch.device("cpu"))
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        if n is not None:
            groups.setdefault(n, []).append(i)
    routes = [
        (n, torch.tensor(idx, dtype=torch.long, device=device), _span(idx)) for n, idx in groups.items()
    ]
    try:
        for _, host in layers:
            host.set_routes(len(names), routes)
        yield model
    finally:
        for _, host in layers:
            host.set_routes(None)


def _span(rows: list[int]) -> tuple[int, int] | None:
    """``(start, stop)`` when ``rows`` (ascending) are one contiguous run: a batch sorted by
    adapter is then routed through slices, with no gathers."""
    return (rows[0], rows[-1] + 1) if rows[-1] - rows[0] + 1 == len(rows) else None
