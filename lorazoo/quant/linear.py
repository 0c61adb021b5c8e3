"""``NF4Linear``: a frozen linear layer whose weight is held in NF4 storage.

State-dict keys (under the layer's prefix):

==========================  ===========  ===========================================================
key                         dtype        shape
==========================  ===========  ===========================================================
``weight_codes``            uint8        ``[ceil(out·in / 2)]``: two 4-bit codes per byte, high
                                         nibble first, row-major order of the weight
``weight_absmax``           uint8        ``[ceil(out·in / 64)]`` with double quantisation (the
                                         centred block scales, 8-bit); float32 without it
``weight_absmax_scale``     float32      ``[ceil(out·in / 16384)]`` (double quantisation only)
``weight_absmax_offset``    float32      ``[]`` (double quantisation only)
``bias``                    the layer's  ``[out]`` (when the layer has a bias; a frozen parameter)
==========================  ===========  ===========================================================

The forward pass dequantises the weight into the input's dtype (in bounded chunks, see
:func:`lorazoo.quant.dequantize_nf4`) and runs the same ``F.linear`` a dense layer holding that
weight runs, so the output equals the dense layer's (bit for bit, except that a ``-0.0`` output
comes out as ``+0.0``, so that adding an exactly-zero adapter output changes no bit). The
backward pass gives the input (and, if asked for, the bias) its gradient; the quantised weight has
none.

``module.to(dtype)`` and ``module.half()`` leave the quantised buffers as they are (casting
them would destroy the storage); only the bias and the nominal ``weight_dtype`` follow.

**Dense mode (a merged weight).** :meth:`NF4Linear.hold_dense` puts a dense ``out × in``
weight in place of the packed storage: forward then runs ``F.linear`` on that weight, and the
state dict holds ``weight`` (the dense tensor, a frozen parameter) and ``bias`` only, as an
``nn.Linear``'s would; the packed buffers are kept aside, untouched, as non-persistent buffers
(device moves move them; dtype casts cast the dense weight, never the packed bytes). Memory grows
by the dense weight while it is held. :meth:`NF4Linear.drop_dense` drops it and makes the
packed buffers the layer's weight again: the same tensors, so the same bytes. Both are all or
nothing, also when interrupted. Requantising a dense weight is a separate, explicit call
(:meth:`NF4Linear.export_nf4`), which reports the rounding error it makes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine import _interrupt
from ..errors import ConfigError, MergeError
from .nf4 import NF4Weight, QuantError, dequantize_nf4, quant_error, quantize_nf4, storage_sizes

_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_QUANT_BUFFERS = ("weight_codes", "weight_absmax", "weight_absmax_scale", "weight_absmax_offset")


class _NF4Matmul(torch.autograd.Function):
    """``F.linear(x, dequant(Q), bias)`` with gradients for ``x`` and ``bias`` only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bias: Tensor | None, q: NF4Weight) -> Tensor:  # type: ignore[override]
        ctx.q = q
        ctx.bias_shape = None if bias is None else bias.shape
        w = dequantize_nf4(q, x.dtype)
        # ``+ 0.0`` turns the -0.0 outputs of zero rows (NF4 has an exact zero code, so whole
        # blocks of a weight can be 0) into +0.0 and changes nothing else: an adapter that adds
        # exactly zero (LoRA at initialisation) then leaves every output bit as it was.
        return F.linear(x, w, bias) + 0.0  # a fresh tensor (not a view), which callers may add into

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = grad.matmul(dequantize_nf4(ctx.q, grad.dtype))
        if ctx.needs_input_grad[1]:
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gx, gb, None


class NF4Linear(nn.Module):
    """A frozen ``y = x Wᵀ + b`` with ``W`` in NF4 storage (block 64, optional double
    quantisation of the block scales). Build one with :meth:`from_linear`; get a dense layer
    back with :meth:`to_linear`."""

    weight_codes: Tensor
    weight_absmax: Tensor
    weight_absmax_scale: Tensor | None
    weight_absmax_offset: Tensor | None
    weight: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        double_quant: bool = True,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ConfigError(f"NF4Linear needs positive sizes, got in={in_features}, out={out_features}")
        if weight_dtype not in _WEIGHT_DTYPES:
            raise ConfigError(
                f"weight_dtype must be float32, bfloat16, float16 or float64, not {weight_dtype}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.double_quant = double_quant
        self.weight_dtype = weight_dtype
        sizes = storage_sizes(in_features * out_features, double_quant)
        for name in _QUANT_BUFFERS:
            key = name[len("weight_") :]
            if key in sizes:
                shape, dtype = sizes[key]
                self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
            else:
                self.register_buffer(name, None)
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=weight_dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)
        self.register_parameter("weight", None)  # the dense weight, only while one is held

    # ---- conversion ---------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, double_quant: bool = True) -> NF4Linear:
        """Quantise ``linear``'s weight (its bias is copied unchanged). ``linear`` is not modified."""
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        q = quantize_nf4(w.detach(), double_quant)
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            double_quant=double_quant,
            weight_dtype=w.dtype,
            device=w.device,
        )
        layer.load_nf4(q)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    @classmethod
    def from_nf4(cls, q: NF4Weight, bias: Tensor | None = None) -> NF4Linear:
        """A layer holding the NF4 storage ``q`` (a 2-D ``out × in`` weight; its tensors are
        taken as they are, not copied) and a frozen copy of ``bias`` (or none)."""
        if len(q.shape) != 2:
            raise ConfigError(f"an NF4Linear weight is 2-D (out x in), got shape {tuple(q.shape)}")
        out_f, in_f = q.shape
        layer = cls(
            in_f,
            out_f,
            bias=bias is not None,
            double_quant=q.double_quant,
            weight_dtype=q.dtype,
            device=q.codes.device,
        )
        layer.load_nf4(q)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(q.codes.device).clone(), requires_grad=False)
        return layer

    def to_linear(self, dtype: torch.dtype | None = None, *, keep_bias: bool = False) -> nn.Linear:
        """A dense ``nn.Linear`` holding the dequantised packed weight (in ``dtype``, default
        ``weight_dtype``; a dense weight held by :meth:`hold_dense` is not what it returns).

        The bias is a copy, unless ``keep_bias``: then the new layer holds this layer's bias
        parameter object itself (same tensor, same ``requires_grad``), which is what swapping
        the new layer in for this one wants; ``keep_bias`` with a ``dtype`` other than the
        bias's is refused, as the cast would make a new tensor. This layer is not modified."""
        dtype = dtype or self.weight_dtype
        device = self.weight_codes.device
        bias = self.bias
        if keep_bias and bias is not None and bias.dtype != dtype:
            raise ConfigError(
                f"keep_bias=True keeps the {bias.dtype} bias object, which cannot be a {dtype} bias; "
                f"call to_linear({bias.dtype}, keep_bias=True) or to_linear({dtype}) for a cast copy"
            )
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        out.weight = nn.Parameter(self.dequantized_weight(dtype))
        if bias is not None:
            if keep_bias:
                out.bias = bias
            else:
                out.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype, copy=True))
        return out

    def nf4(self) -> NF4Weight:
        """The stored weight as an :class:`NF4Weight` (sharing this layer's buffers)."""
        return NF4Weight(
            self.weight_codes,
            self.weight_absmax,
            self.weight_absmax_scale,
            self.weight_absmax_offset,
            torch.Size((self.out_features, self.in_features)),
            self.weight_dtype,
        )

    def load_nf4(self, q: NF4Weight) -> None:
        """Replace the stored weight by ``q`` (same shape and double-quantisation setting)."""
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise ConfigError(
                f"NF4 weight of shape {tuple(q.shape)} does not fit a layer "
                f"{self.out_features}x{self.in_features}"
            )
        if self.weight is not None:
            raise MergeError(
                "this layer holds a dense (merged) weight; drop it with drop_dense() before "
                "replacing the packed storage underneath it"
            )
        if q.double_quant != self.double_quant:
            raise ConfigError(
                f"this layer stores {'double-quantised' if self.double_quant else 'float32'} scales; "
                f"the weight given has {'double-quantised' if q.double_quant else 'float32'} ones"
            )
        self.weight_codes = q.codes
        self.weight_absmax = q.absmax
        self.weight_absmax_scale = q.absmax_scale
        self.weight_absmax_offset = q.absmax_offset
        self.weight_dtype = q.dtype

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The packed weight dequantised, as a new dense ``out × in`` tensor (also while a dense
        weight is held: this is the base that :meth:`drop_dense` returns to)."""
        return dequantize_nf4(self.nf4(), dtype or self.weight_dtype)

    # ---- dense mode: a merged weight in place of the packed storage ----------------------------

    @property
    def holds_dense(self) -> bool:
        """True while a dense weight (:meth:`hold_dense`) replaces the packed storage."""
        return self.weight is not None

    def _packed_names(self) -> list[str]:
        return [n for n in _QUANT_BUFFERS if self._buffers.get(n) is not None]

    def hold_dense(self, weight: Tensor) -> None:
        """Compute with the dense ``out × in`` tensor ``weight`` (typically a merged weight,
        ``cast(dequant(Q) + ΔW)`` formed by the caller in float32) instead of the packed storage.

        The layer takes ``weight`` as it is (no copy) as a frozen parameter named ``weight``; the
        packed buffers stay, untouched, out of the state dict. Memory grows by the dense weight
        until :meth:`drop_dense`. ``weight`` must have the layer's ``weight_dtype`` (cast the
        merged weight to it), so holding and dropping leave the layer's nominal dtype as it was.
        All or nothing: on any failure, an interrupt included, the layer is as it was."""
        if self.weight is not None:
            raise MergeError(
                "this layer already holds a dense weight; drop_dense() it before holding another"
            )
        want = (self.out_features, self.in_features)
        if not isinstance(weight, Tensor) or tuple(weight.shape) != want:
            got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ConfigError(f"hold_dense takes an {want[0]}x{want[1]} weight (out x in), got {got}")
        if weight.dtype != self.weight_dtype:
            raise ConfigError(
                f"the dense weight is {weight.dtype} but this layer's weight_dtype is {self.weight_dtype}; "
                f"cast it (e.g. merged.to({self.weight_dtype})) or move the layer to that dtype first"
            )
        if weight.device != self.weight_codes.device:
            raise ConfigError(
                f"the dense weight is on {weight.device} but the layer on {self.weight_codes.device}; "
                "move it first"
            )
        param = nn.Parameter(weight.detach(), requires_grad=False)
        names = self._packed_names()
        old_np = set(self._non_persistent_buffers_set)
        _interrupt.checkpoint()
        try:
            self._non_persistent_buffers_set.update(names)
            _interrupt.checkpoint()
            self._parameters["weight"] = param
            _interrupt.checkpoint()
        except BaseException:
            self._parameters["weight"] = None
            self._non_persistent_buffers_set.clear()
            self._non_persistent_buffers_set.update(old_np)
            raise

    def drop_dense(self) -> Tensor:
        """Drop the dense weight :meth:`hold_dense` gave and compute with the packed storage
        again; returns the dropped tensor. The packed buffers are the very tensors that were
        set aside, so every byte is as before the hold. A ``.to(dtype)`` made while dense stays in
        effect (``weight_dtype`` is then that dtype). All or nothing."""
        param = self.weight
        if param is None:
            raise MergeError("this layer holds no dense weight; there is nothing to drop")
        names = self._packed_names()
        old_np = set(self._non_persistent_buffers_set)
        _interrupt.checkpoint()
        try:
            self._parameters["weight"] = None
            _interrupt.checkpoint()
            self._non_persistent_buffers_set.difference_update(names)
        except BaseException:
            self._parameters["weight"] = param
            self._non_persistent_buffers_set.clear()
            self._non_persistent_buffers_set.update(old_np)
            raise
        return param.data

    def export_nf4(self, double_quant: bool | None = None) -> tuple[NF4Linear, QuantError]:
        """Requantise what this layer computes with into a new packed :class:`NF4Linear`, and
        report the rounding error (measured against that dense weight).

        This is the explicit export step for a merged layer: NF4 cannot hold
        ``dequant(Q) + ΔW`` exactly, so requantising loses something, and the error says how
        much. Without a dense weight the packed bytes are copied as they are (error 0).
        ``double_quant`` defaults to this layer's setting. This layer is not modified (swap the
        returned layer in to apply it); its bias is copied."""
        dq = self.double_quant if double_quant is None else double_quant
        if self.weight is None and dq == self.double_quant:
            src = self.nf4()
            q = NF4Weight(
                *(
                    None if t is None else t.clone()
                    for t in (src.codes, src.absmax, src.absmax_scale, src.absmax_offset)
                ),
                src.shape,
                self.weight_dtype,
            )
            err = quant_error(self.dequantized_weight(torch.float32), q)
        else:
            dense = self.weight.detach() if self.weight is not None else self.dequantized_weight()
            q = quantize_nf4(dense, dq)
            err = quant_error(dense, q)
        return type(self).from_nf4(q, self.bias), err

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ConfigError(
                f"NF4Linear expects inputs with {self.in_features} features, got shape {tuple(x.shape)}"
            )
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if self.weight is not None:
            w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
            return F.linear(x, w, bias)
        return _NF4Matmul.apply(x, bias, self.nf4())

    # ---- dtype / device moves keep the packed storage intact ---------------------------------

    def _apply(self, fn: Any, recurse: bool = True) -> NF4Linear:  # type: ignore[override]
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=self.weight_codes.device))
        saved = {name: self._buffers[name] for name in _QUANT_BUFFERS}
        for name in _QUANT_BUFFERS:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in saved.items():
                self._buffers[name] = None if t is None else t.to(probe.device)
        if probe.dtype in _WEIGHT_DTYPES:
            self.weight_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        q = self.nf4()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, double_quant={self.double_quant}, "
            f"weight_dtype={self.weight_dtype}, bits_per_param={q.bits_per_param():.3f}"
            + (", holds a dense weight" if self.weight is not None else "")
        )
