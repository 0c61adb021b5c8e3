"""The ``nn.Linear`` kind, and the linear forward every layer that is a linear map shares.

``y = x·Wᵀ + b + Σ c_a(x)``. Adapters that report plain low-rank factors
(:meth:`~lorazoo.Variant.plain_lowrank`) take the fast paths: one fused ``addmm_`` into the base
output, a cast-aware product for adapters in another dtype than the layer, one shared product
over a routed batch. Any other adapter computes its contribution with its own ``forward``.
A kind whose layer is a linear map stored another way (transformers' ``Conv1D``) subclasses
:class:`AdaptedLinear` and changes only :meth:`AdaptedLinear.base_forward` and the weight
layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...variant import PlainLowRank, Variant
from ..host import AdaptedLayer, Route, _add_rows, fast_applies
from . import LayerKind


def _keeps_input(f: PlainLowRank, training: bool, x: Tensor) -> bool:
    """A plain low-rank adapter in another dtype than the layer (fp32 adapters on a bf16 or fp16
    base, the default), without active dropout or autocast: :class:`_CastLowRank` applies."""
    A = f.A
    return (
        A.dtype != x.dtype
        and A.device == x.device
        and (isinstance(f.dropout, nn.Identity) or not training)
        and not torch.is_autocast_enabled(x.device.type)
    )


class _CastLowRank(torch.autograd.Function):
    """``(s·B·A·x.to(A.dtype)).to(out_dtype)``, the general path of a plain low-rank adapter
    whose dtype differs from the layer's, with the same operations and so the same bits, forward
    and backward. What differs is what backward keeps: the input ``x`` in its own (half) dtype,
    cast again when needed, instead of autograd's adapter-dtype copy of it. That copy is twice
    the size of ``x``, and every adapter on the same input (q, k and v) made its own, where
    ``x`` itself is one tensor that all of them share."""

    @staticmethod
    def forward(ctx: Any, x, A, B, scale, out_dtype):  # type: ignore[override]
        h = F.linear(x.to(A.dtype), A)
        ctx.save_for_backward(x, A, B, h)
        ctx.scale = scale
        return (F.linear(h, B) * scale).to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad):  # type: ignore[override]
        x, A, B, h = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        gs = grad.to(A.dtype) * ctx.scale  # the gradient of F.linear(h, B), as autograd forms it
        gx = ga = gb = None
        if need_b:
            gb = gs.reshape(-1, gs.shape[-1]).T @ h.reshape(-1, h.shape[-1])
        if need_x or need_a:
            gh = gs @ B
            if need_a:
                ga = gh.reshape(-1, gh.shape[-1]).T @ x.reshape(-1, x.shape[-1]).to(A.dtype)
            if need_x:
                gx = (gh @ A).to(x.dtype)
        return gx, ga, gb, None, None


def _addmm_rows(y: Tensor, route: Route, h: Tensor, B: Tensor, alpha: float) -> None:
    """``y[rows] += alpha·h·Bᵀ``; into a contiguous run of rows the matmul accumulates itself,
    as the fused forward does."""
    if route.span is not None:
        rows = y[route.span[0] : route.span[1]].view(-1, y.shape[-1])
        rows.addmm_(h.reshape(-1, h.shape[-1]), B.t(), alpha=alpha)
    else:
        y.index_add_(0, route.rows, F.linear(h, B), alpha=alpha)


class AdaptedLinear(AdaptedLayer):
    """An ``nn.Linear`` with named adapters beside it.

    ``forward(x) = W x + b + Σ_{active, unmerged} c_a(x)``.
    """

    def base_forward(self, x: Tensor) -> Tensor:
        """The base layer's output."""
        return F.linear(x, self.weight, self.bias)

    def _add_fused(self, out: Tensor, x: Tensor, fast: Sequence[PlainLowRank]) -> None:
        flat = out.view(-1, self.out_features)
        x2 = x.reshape(-1, self.in_features)
        for f in fast:
            h = F.linear(f.dropout(x2), f.A)
            flat.addmm_(h, f.B.t(), alpha=f.scale)

    def _unfused(self, adapter: Variant, x: Tensor, y: Tensor, f: PlainLowRank | None = None) -> Tensor:
        """An adapter's contribution off the fused path, in the output dtype: a plain low-rank
        adapter in another dtype than the layer through :class:`_CastLowRank`, any other
        through its own ``forward`` (which sees ``y``, the base output, unchanged)."""
        if f is None and adapter in self._fusable:
            f = adapter.plain_lowrank()
        if f is not None and _keeps_input(f, adapter.training, x):
            return _CastLowRank.apply(x, f.A, f.B, f.scale, y.dtype)
        return adapter(x, y, self).to(y.dtype)

    def _add_routes(self, routes: Sequence[Route], x: Tensor, y: Tensor) -> None:
        """Add each route's contribution at its rows of ``y``. Plain low-rank adapters without
        active dropout share one product with their stacked ``A`` factors over the whole batch,
        so only ``r``-wide rows are gathered, not the input's; then ``B·h`` on their rows,
        accumulated by the matmul into a contiguous run of rows (:func:`_addmm_rows`). Any other
        adapter computes its contribution (:meth:`_unfused`) on its rows of the input and of a
        copy of the base output."""
        plain: list[tuple[Route, PlainLowRank]] = []
        for r in routes:
            f = r.adapter.plain_lowrank() if r.adapter in self._fusable else None
            if (
                f is not None
                and fast_applies(f, x, y)
                and (isinstance(f.dropout, nn.Identity) or not r.adapter.training)
            ):
                plain.append((r, f))
        stacked = plain if len(plain) > 1 else []
        if stacked:
            h_all = F.linear(x, torch.cat([f.A for _, f in stacked]))
            start = 0
            for r, f in stacked:
                width = f.A.shape[0]
                _addmm_rows(y, r, r.take(h_all)[..., start : start + width], f.B, f.scale)
                start += width
        done = {id(r) for r, _ in stacked}
        for r in routes:
            if id(r) in done:
                continue
            a, xr = r.adapter, r.take(x)
            f = a.plain_lowrank() if a in self._fusable else None
            if f is not None and fast_applies(f, xr, y):
                _addmm_rows(y, r, F.linear(f.dropout(xr), f.A), f.B, f.scale)
            else:
                _add_rows(y, r, self._unfused(a, xr, y.index_select(0, r.rows), f))


class LinearKind(LayerKind):
    """``nn.Linear`` and subclasses that keep its forward."""

    name = "linear"
    adapts_as = "linear"
    linear = True
    host_class = AdaptedLinear
    label = "torch.nn.Linear"

    def recognise(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and not isinstance(module, AdaptedLayer)

    def refusal(self, module: nn.Module) -> str | None:
        if type(module).forward is not nn.Linear.forward:
            return f"{type(module).__name__} overrides nn.Linear's forward"
        return None

    def dims(self, module: nn.Module) -> tuple[int, int]:
        return module.out_features, module.in_features

    def example(self, d_in: int, d_out: int, bias: bool, dtype: torch.dtype) -> nn.Module:
        return nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
