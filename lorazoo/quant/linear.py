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
weight runs, so the output is bit for bit the dense layer's. The backward pass gives the input
(and, if asked for, the bias) its gradient; the quantised weight has none.

``module.to(dtype)`` and ``module.half()`` leave the quantised buffers as they are (casting
them would destroy the storage); only the bias and the nominal ``weight_dtype`` follow.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .nf4 import NF4Weight, dequantize_nf4, quantize_nf4, storage_sizes

_QUANT_BUFFERS = ("weight_codes", "weight_absmax", "weight_absmax_scale", "weight_absmax_offset")


class _NF4Matmul(torch.autograd.Function):
    """``F.linear(x, dequant(Q), bias)`` with gradients for ``x`` and ``bias`` only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bias: Tensor | None, q: NF4Weight) -> Tensor:  # type: ignore[override]
        ctx.q = q
        ctx.bias_shape = None if bias is None else bias.shape
        w = dequantize_nf4(q, x.dtype)
        return F.linear(x, w, bias)

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
        if weight_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"weight_dtype must be float32, bfloat16 or float16, not {weight_dtype}")
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
            with torch.no_grad():
                layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense ``nn.Linear`` holding the dequantised weight (in ``dtype``, default
        ``weight_dtype``) and a copy of the bias. This layer is not modified."""
        dtype = dtype or self.weight_dtype
        device = self.weight_codes.device
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        out.weight = nn.Parameter(self.dequantized_weight(dtype))
        if self.bias is not None:
            out.bias = nn.Parameter(self.bias.detach().to(device=device, dtype=dtype, copy=True))
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
        """The weight this layer computes with, as a new dense tensor."""
        return dequantize_nf4(self.nf4(), dtype or self.weight_dtype)

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ConfigError(
                f"NF4Linear expects inputs with {self.in_features} features, got shape {tuple(x.shape)}"
            )
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
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
        if probe.dtype in (torch.float32, torch.bfloat16, torch.float16):
            self.weight_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        q = self.nf4()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, double_quant={self.double_quant}, "
            f"weight_dtype={self.weight_dtype}, bits_per_param={q.bits_per_param():.3f}"
        )
