"""The NF4 kind: lorazoo's :class:`~lorazoo.quant.NF4Linear` (a frozen linear layer whose weight
is held as 4-bit NormalFloat codes with block-64 absmax scales).

Variants see it as any linear layer (``adapts_as = "linear"``): ``LayerInfo.weight`` and the
host's ``weight`` are the dequantised ``d_out × d_in`` weight (``dequant(Q)`` in the layer's
``weight_dtype``), which is the base the adapters train on, and ``LayerInfo.storage`` is
``"nf4"``. The host holds the packed buffers under the layer's own state-dict keys
(``weight_codes``, ``weight_absmax``, ``weight_absmax_scale``, ``weight_absmax_offset``) and
the bias, as the same tensor objects.

Forward: the layer's own computation (dequantise into the input's dtype, ``F.linear``; no
gradient for the base) plus the adapters, with the linear kind's fast paths.

Merge: the packed storage cannot hold ``dequant(Q) + ΔW``, so a merge computes the dense
``cast(dequant(Q) + ΔW)`` (dequantised into float32, the update added in float32, one rounding
to ``weight_dtype``) and the layer computes with it in place of the packed storage; memory grows
by that dense weight while merged. The packed buffers stay untouched beside it, out of the state
dict (which then holds ``weight`` and ``bias``, as an ``nn.Linear``'s would). Unmerge drops the
dense weight: the packed tensors are the very ones set aside, so every byte comes back. Both
are all or nothing, an interrupt included. Base rewrites (OLoRA's ``prepare_base``) are refused:
the packed storage cannot hold a rewritten weight without requantising it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import MergeError
from ...quant.linear import _QUANT_BUFFERS, _WEIGHT_DTYPES, NF4Linear, _NF4Matmul
from ...quant.nf4 import NF4Weight, dequantize_nf4
from .. import _interrupt
from ..exact import Residual, acc_dtype, content_sum, fingerprint
from ..host import MergeState
from .linear import AdaptedLinear, LinearKind


def _no_residual(numel: int, dense: Tensor) -> Residual:
    """The residual of an NF4 merge: nothing (the packed bytes are kept, not recomputed), with the
    checksum of the dense weight the merge put in place."""
    empty = torch.zeros(0, dtype=torch.int64, device=dense.device)
    return Residual(
        numel,
        None,
        None,
        None,
        empty,
        torch.zeros(0, dtype=torch.uint8, device=dense.device),
        content_sum(dense),
    )


class AdaptedNF4(AdaptedLinear):
    """An :class:`~lorazoo.quant.NF4Linear` with named adapters beside it."""

    base_tensors = (*_QUANT_BUFFERS, "bias")
    weight_name = "weight_codes"
    base_rewrites = False

    def __init__(self, base: nn.Module, kind: Any):
        super().__init__(base, kind)
        self._parameters["weight"] = None  # the dense (merged) weight, only while merged

    # ---- the weight ---------------------------------------------------------------------------

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.original.weight_dtype

    @property
    def double_quant(self) -> bool:
        return self.original.double_quant

    @property
    def holds_dense(self) -> bool:
        return self._parameters.get("weight") is not None

    def nf4(self) -> NF4Weight:
        """The packed weight (sharing this host's buffers)."""
        return NF4Weight(
            self._buffers["weight_codes"],
            self._buffers["weight_absmax"],
            self._buffers.get("weight_absmax_scale"),
            self._buffers.get("weight_absmax_offset"),
            torch.Size((self.out_features, self.in_features)),
            self.weight_dtype,
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """``dequant(Q)`` as a new dense ``d_out × d_in`` tensor (the base, also while merged)."""
        return dequantize_nf4(self.nf4(), dtype or self.weight_dtype)

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        """What the layer computes with, as the ``d_out × d_in`` matrix: the dense merged weight
        while merged, else ``dequant(Q)`` (a fresh tensor on each read)."""
        held = self._parameters.get("weight")
        return held if held is not None else self.dequantized_weight()

    @property
    def stored_weight(self) -> Tensor:  # type: ignore[override]
        return self.weight

    def weight_view(self) -> Tensor:
        return self.weight

    def merge_target(self) -> Tensor:
        return self.weight

    # ---- forward ------------------------------------------------------------------------------

    def base_forward(self, x: Tensor) -> Tensor:
        # NF4Linear's own computation, so an adapted layer with nothing active gives its bits.
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        held = self._parameters.get("weight")
        if held is not None:
            return F.linear(x, held if held.dtype == x.dtype else held.to(x.dtype), bias)
        return _NF4Matmul.apply(x, bias, self.nf4())

    # ---- merge: a dense weight in place of the packed storage ---------------------------------

    def _dense(self, factors: tuple[Tensor, Tensor, Tensor | None]) -> Tensor:
        """``cast(g ⊙_row dequant(Q) + B·A)``, computed in float32 (one rounding at the end)."""
        B, A, g = factors
        acc = acc_dtype(self.weight_dtype)
        w = self.dequantized_weight(acc)
        if g is not None:
            w = w * g.to(device=w.device, dtype=acc).unsqueeze(1)
        w = torch.addmm(w, B.to(device=w.device, dtype=acc), A.to(device=w.device, dtype=acc))
        return w.to(self.weight_dtype)

    def _hold(self, dense: Tensor) -> None:
        """Compute with ``dense`` instead of the packed storage (the buffers stay, out of the
        state dict). All or nothing."""
        names = [n for n in _QUANT_BUFFERS if self._buffers.get(n) is not None]
        old = set(self._non_persistent_buffers_set)
        try:
            self._non_persistent_buffers_set.update(names)
            self._parameters["weight"] = nn.Parameter(dense, requires_grad=False)
        except BaseException:
            self._parameters["weight"] = None
            self._non_persistent_buffers_set.clear()
            self._non_persistent_buffers_set.update(old)
            raise

    def _drop(self) -> None:
        """Compute with the packed storage again (the very tensors set aside). All or nothing."""
        held = self._parameters.get("weight")
        names = [n for n in _QUANT_BUFFERS if self._buffers.get(n) is not None]
        old = set(self._non_persistent_buffers_set)
        try:
            self._parameters["weight"] = None
            self._non_persistent_buffers_set.difference_update(names)
        except BaseException:
            self._parameters["weight"] = held
            self._non_persistent_buffers_set.clear()
            self._non_persistent_buffers_set.update(old)
            raise

    @torch.no_grad()
    def merge(self, names, *, interruptible: bool = True) -> MergeState:
        """Hold ``cast(dequant(Q) + ΣΔW)`` in place of the packed storage; :meth:`unmerge` gives
        the packed bytes back untouched. All or nothing."""
        if self.merged is not None:
            raise MergeError(f"adapters {list(self.merged.names)} are already merged; unmerge first")
        if self._routes is not None:
            raise MergeError("cannot merge while a batch is routed (inside lorazoo.route)")
        names = tuple(names)
        if not names:
            raise MergeError("nothing to merge")
        B, A, g, scales = self._factors(names, None)
        factors = (B, A, g)
        dense = self._dense(factors)
        if interruptible:
            _interrupt.checkpoint()
        state = MergeState(
            names,
            scales,
            _no_residual(dense.numel(), dense),
            factors,
            (),
            self.weight_dtype,
        )
        try:
            self._hold(dense)
            if interruptible:
                _interrupt.checkpoint()
            state.weight_print = fingerprint(self._parameters["weight"])
            self.merged = state
            self._refresh()
        except BaseException:
            if self.holds_dense:
                self._drop()
            self.merged = None
            self._refresh()
            raise
        return state

    @torch.no_grad()
    def unmerge(self, exact: bool = True, *, interruptible: bool = True) -> MergeState:
        """Drop the dense weight; the packed storage (never changed) is the base again, bit for
        bit. ``exact=True`` refuses when the dense weight was changed while merged (that change
        would be lost); ``exact=False`` drops it anyway: an NF4 base cannot keep such a change.
        All or nothing."""
        self.check_unmerge(exact)
        state = self.merged
        assert state is not None
        try:
            self._drop()
            if interruptible:
                _interrupt.checkpoint()
            self.merged = None
            self._refresh()
        except BaseException:
            if not self.holds_dense:
                self._hold(self._dense(state.factors))
                state.weight_print = fingerprint(self._parameters["weight"])
            self.merged = state
            self._refresh()
            raise
        return state

    @torch.no_grad()
    def remerge(self, state: MergeState) -> None:
        """Put back a merge :meth:`unmerge` took out, bit for bit (the dense weight is recomputed
        from the same factors and the same packed bytes)."""
        self._hold(self._dense(state.factors))
        state.weight_print = fingerprint(self._parameters["weight"])
        self.merged = state
        self._refresh()

    def _wrote_weight(self) -> None:
        pass

    # ---- casts and moves keep the packed storage intact ----------------------------------------

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """Device moves move the packed buffers; dtype casts leave them as they are (casting them
        would destroy the storage) and change ``weight_dtype``, the bias and the adapters. A
        merged layer is unmerged around a dtype cast and merged again in the new dtype."""
        codes = self._buffers["weight_codes"]
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=codes.device))
        casts = isinstance(probe, Tensor) and probe.dtype != self.weight_dtype
        state = self.merged if casts else None
        if state is not None:
            self.unmerge()
        saved = {n: self._buffers[n] for n in _QUANT_BUFFERS}
        for n in _QUANT_BUFFERS:
            self._buffers[n] = None
        try:
            nn.Module._apply(self, fn, recurse)
        finally:
            for n, t in saved.items():
                self._buffers[n] = None if t is None else t.to(probe.device)
        if isinstance(probe, Tensor) and probe.dtype in _WEIGHT_DTYPES:
            self.original.weight_dtype = probe.dtype
        if state is not None:
            self.merge(state.names)
        return self

    def hand_back(self) -> None:
        if self.holds_dense:  # eject unmerges first; never hand a dense weight to the NF4Linear
            raise MergeError("this NF4 layer still holds a merged weight; unmerge before ejecting")
        super().hand_back()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", nf4, weight_dtype={self.weight_dtype}"


class NF4Kind(LinearKind):
    """lorazoo's :class:`~lorazoo.quant.NF4Linear` (packed, not holding a dense weight)."""

    name = "nf4"
    adapts_as = "linear"
    linear = True
    storage = "nf4"
    host_class = AdaptedNF4
    label = "lorazoo.quant.NF4Linear"

    def recognise(self, module: nn.Module) -> bool:
        return isinstance(module, NF4Linear)

    def refusal(self, module: nn.Module) -> str | None:
        if type(module).forward is not NF4Linear.forward:
            return f"{type(module).__name__} overrides NF4Linear's forward"
        if module.holds_dense:
            return "it holds a dense weight (hold_dense); drop_dense() it first"
        return None

    def dims(self, module: nn.Module) -> tuple[int, int]:
        return module.out_features, module.in_features

    def stored_weight(self, module: nn.Module) -> Tensor:
        """The dequantised weight (a new tensor; the packed codes are not a weight matrix)."""
        if isinstance(module, AdaptedNF4):
            return module.weight
        return module.dequantized_weight()

    def example(self, d_in: int, d_out: int, bias: bool, dtype: torch.dtype) -> nn.Module:
        dense = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
        return NF4Linear.from_linear(dense, double_quant=True)
