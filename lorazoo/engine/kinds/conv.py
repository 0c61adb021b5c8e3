"""The ``nn.Conv1d`` and ``nn.Conv2d`` kinds (in PEFT's conv LoRA layout).

A convolution with ``groups=1`` is a linear map applied to every input patch: its weight
``out × in × k…`` flattened to ``out × (in·k…)`` is the ``d_out × d_in`` matrix variants see
(``d_in = in·k…``, a view of the stored weight, sharing its memory). An adapter's ``A``
(``r × d_in``) is then a convolution with the layer's kernel size, stride, padding and dilation
(``r × in × k…``) and ``B`` (``out × r``) a 1×1 convolution, so

    y = conv(x, W) + b + s·B(A(drop(x))),   ΔW = (s·B·A) reshaped to ``out × in × k…``

which is PEFT's ``lora_A`` / ``lora_B`` for conv layers. The contribution is computed as
convolutions, never by forming ``ΔW``: ``A`` as a convolution over the input, then ``B`` as one
batched matrix product accumulated into the base output in place (the fast path, for adapters
that report plain low-rank factors). Merges write the flattened view, so they and their
unmerge are the exact ones every kind shares; a row-scaling update (DoRA) scales output
channels, its norm running over ``in·k…`` as PEFT's conv DoRA does.

Variants opt in by listing ``"conv"`` in their ``layer_kinds``. A variant that is not a plain
low-rank product gets the conv input in ``forward`` and computes its own contribution, with
:meth:`AdaptedConv.lowrank_conv` and :meth:`AdaptedConv.conv_without_bias` to help.

Refused: ``groups > 1`` (each group is its own smaller map; the flattened weight is not the
layer's linear map) and ``padding_mode`` other than ``"zeros"`` (the padded input is not what
the adapter's convolution would see).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...variant import PlainLowRank, Variant
from ..host import AdaptedLayer, Route, _add_rows
from . import LayerKind


class AdaptedConv(AdaptedLayer):
    """An ``nn.Conv1d`` / ``nn.Conv2d`` (``groups=1``, zero padding) with named adapters beside it.

    ``weight`` and ``bias`` are the layer's own tensors (``weight`` in its ``out × in × k…``
    layout); :meth:`weight_view` is the ``out × (in·k…)`` matrix variants see."""

    spatial: ClassVar[int] = 2

    def __init__(self, base: nn.Module, kind: LayerKind):
        super().__init__(base, kind)
        self.in_channels = base.in_channels
        self.out_channels = base.out_channels
        self.kernel_size = tuple(base.kernel_size)
        self.stride = tuple(base.stride)
        self.padding = base.padding if isinstance(base.padding, str) else tuple(base.padding)
        self.dilation = tuple(base.dilation)
        self.groups = 1
        self.padding_mode = "zeros"

    def _conv(self, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        conv = F.conv2d if self.spatial == 2 else F.conv1d
        return conv(x, w, b, self.stride, self.padding, self.dilation, 1)

    def weight_view(self) -> Tensor:
        return self.stored_weight.view(self.out_features, self.in_features)

    def merge_target(self) -> Tensor:
        return self.weight_view()

    def base_forward(self, x: Tensor) -> Tensor:
        return self._conv(x, self.weight, self.bias)

    def conv_without_bias(self, x: Tensor) -> Tensor:
        """The base convolution of ``x`` without the bias."""
        return self._conv(x.to(self.weight.dtype), self.weight)

    def _a_kernel(self, A: Tensor) -> Tensor:
        return A.view(A.shape[0], self.in_channels, *self.kernel_size)

    def lowrank_conv(self, x: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
        """``s·B(A(x))`` as convolutions (``A`` ``r × d_in``, ``B`` ``d_out × r``), in ``A``'s
        dtype: ``A`` with the layer's kernel, stride, padding and dilation, ``B`` as 1×1."""
        h = self._conv(x.to(A.dtype), self._a_kernel(A))
        conv = F.conv2d if self.spatial == 2 else F.conv1d  # 1×1: no stride, padding, dilation
        return conv(h, B.view(*B.shape, *(1,) * self.spatial)) * scale

    def _add_fused(self, out: Tensor, x: Tensor, fast: Sequence[PlainLowRank]) -> None:
        # B's 1×1 product accumulates into the output, per sample, as one batched matmul.
        n = out.shape[0]
        flat = out.view(n, self.out_features, -1)
        for f in fast:
            h = self._conv(f.dropout(x), self._a_kernel(f.A)).reshape(n, f.A.shape[0], -1)
            flat.baddbmm_(f.B.expand(n, *f.B.shape), h, alpha=f.scale)

    def _unfused(self, adapter: Variant, x: Tensor, y: Tensor, f: PlainLowRank | None = None) -> Tensor:
        return self._contribution(adapter, x, y, f).to(y.dtype)

    def _contribution(self, adapter: Variant, x: Tensor, y: Tensor, f: PlainLowRank | None = None) -> Tensor:
        if f is None and adapter in self._fusable:
            f = adapter.plain_lowrank()
        if f is not None:
            return self.lowrank_conv(f.dropout(x.to(f.A.dtype)), f.A, f.B, f.scale)
        return adapter(x, y, self)

    def _add_routes(self, routes: Sequence[Route], x: Tensor, y: Tensor) -> None:
        for r in routes:
            _add_rows(y, r, self._contribution(r.adapter, r.take(x), y.index_select(0, r.rows)))

    def extra_repr(self) -> str:
        merged = list(self.merged.names) if self.merged else []
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"bias={self.bias is not None}, active={list(self.active)}, merged={merged}"
        )


class AdaptedConv1d(AdaptedConv):
    spatial = 1


class AdaptedConv2d(AdaptedConv):
    spatial = 2


def _factor_kernel(d_in: int, spatial: int) -> tuple[int, tuple[int, ...]]:
    """``(in_channels, kernel)`` with ``in·k… = d_in``, the kernel as large as small options allow."""
    options = [(3, 3), (2, 2), (1, 3), (1, 2), (1, 1)] if spatial == 2 else [(3,), (2,), (1,)]
    for k in options:
        size = math.prod(k)
        if d_in % size == 0:
            return d_in // size, k
    raise AssertionError("unreachable")


class _ConvKind(LayerKind):
    adapts_as = "conv"
    linear = False
    module_class: ClassVar[type[nn.Module]]
    spatial: ClassVar[int]

    def recognise(self, module: nn.Module) -> bool:
        return isinstance(module, self.module_class) and not isinstance(module, AdaptedLayer)

    def refusal(self, module: nn.Module) -> str | None:
        cls = self.module_class.__name__
        if type(module).forward is not self.module_class.forward:
            return f"{type(module).__name__} overrides nn.{cls}'s forward"
        if module.groups != 1:
            return (
                f"groups={module.groups}: a grouped convolution is {module.groups} separate smaller "
                "maps, not one linear map over every input channel, so a low-rank update of the "
                "whole weight does not apply (PEFT refuses it too); only groups=1 is supported"
            )
        if module.padding_mode != "zeros":
            return (
                f"padding_mode={module.padding_mode!r}: the adapter's convolution would not see "
                "the padded input the layer sees; only padding_mode='zeros' is supported"
            )
        return None

    def dims(self, module: nn.Module) -> tuple[int, int]:
        return module.out_channels, module.in_channels * math.prod(module.kernel_size)

    def weight_view(self, stored: Tensor) -> Tensor:
        return stored.view(stored.shape[0], -1)

    def example(self, d_in: int, d_out: int, bias: bool, dtype: torch.dtype) -> nn.Module:
        c_in, k = _factor_kernel(d_in, self.spatial)
        padding = tuple(x // 2 for x in k)
        return self.module_class(c_in, d_out, k, padding=padding, bias=bias, dtype=dtype)

    def example_input(self, module: nn.Module, batch: tuple[int, ...], generator: torch.Generator) -> Tensor:
        size = (4, 5) if self.spatial == 2 else (6,)
        x = torch.randn(math.prod(batch), module.in_channels, *size, generator=generator)
        return x.clamp(-4, 4)

    def _as_2d(self, module: nn.Module) -> tuple[tuple, tuple, tuple, tuple]:
        def two(v):  # Conv1d's settings as a height-1 Conv2d's
            return (1, v[0]) if self.spatial == 1 else tuple(v)

        pad = module.padding
        pad = (0, pad[0]) if self.spatial == 1 else tuple(pad)
        return two(module.kernel_size), two(module.dilation), pad, two(module.stride)

    def dense_input(self, module: nn.Module, x: Tensor) -> Tensor:
        """The input patches as ``N × L × (in·k…)`` rows (im2col), in the weight view's order."""
        k, d, p, s = self._as_2d(module)
        x4 = x.unsqueeze(2) if self.spatial == 1 else x
        return F.unfold(x4.double(), k, dilation=d, padding=p, stride=s).transpose(1, 2).to(x.dtype)

    def dense_output(self, module: nn.Module, y: Tensor) -> Tensor:
        """The output as ``N × L × out`` rows, matching :meth:`dense_input`."""
        return y.flatten(2).transpose(1, 2)


class Conv1dKind(_ConvKind):
    """``nn.Conv1d`` with ``groups=1`` and zero padding."""

    name = "conv1d"
    host_class = AdaptedConv1d
    label = "torch.nn.Conv1d (groups=1, zero padding)"
    module_class = nn.Conv1d
    spatial = 1


class Conv2dKind(_ConvKind):
    """``nn.Conv2d`` with ``groups=1`` and zero padding."""

    name = "conv2d"
    host_class = AdaptedConv2d
    label = "torch.nn.Conv2d (groups=1, zero padding)"
    module_class = nn.Conv2d
    spatial = 2
