"""transformers' ``Conv1D`` kind (GPT-2's attention and MLP projections).

``Conv1D`` is a linear layer that stores its weight transposed, ``nx × nf`` (in × out), and
computes ``y = b + x·W``. Variants see it as any linear layer: ``d_in = nx``, ``d_out = nf``, and
the host's ``weight`` attribute is the ``nf × nx`` view of the stored parameter (the parameter
itself, under the same name and layout, is what the state dict and ``parameters()`` hold). Merges
and base rewrites write through that view, so row-scaling updates (DoRA) merge with their rows
being output features, and the unmerge is bit-exact as for ``nn.Linear``.

transformers is never imported here: a module is recognised only when ``transformers`` has
already imported its ``pytorch_utils`` module (which any model using ``Conv1D`` has done).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from .linear import AdaptedLinear, LinearKind


def _conv1d_class() -> type | None:
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


class AdaptedConv1D(AdaptedLinear):
    """A transformers ``Conv1D`` with named adapters beside it."""

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        """The base weight as the ``d_out × d_in`` matrix variants see (a transposed view of the
        stored ``d_in × d_out`` parameter)."""
        stored = self._parameters.get("weight")
        if stored is None:  # while the host is being built
            raise AttributeError("weight")
        return stored.t()

    @property
    def nf(self) -> int:
        return self.out_features

    @property
    def nx(self) -> int:
        return self.in_features

    def weight_view(self) -> Tensor:
        return self.stored_weight.t()

    def merge_target(self) -> Tensor:
        # Written through the transposed view: the exact merge works on a contiguous copy of it and
        # writes that back, so row factors (DoRA's per-output-feature scale) apply as for a linear
        # layer.
        return self.stored_weight.t()

    def base_forward(self, x: Tensor) -> Tensor:
        # Conv1D's own computation, so an adapted layer with nothing active gives its bits.
        size_out = x.size()[:-1] + (self.out_features,)
        stored = self.stored_weight
        if self.bias is None:
            y = torch.mm(x.reshape(-1, x.size(-1)), stored)
        else:
            y = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), stored)
        return y.view(size_out)

    def extra_repr(self) -> str:
        merged = list(self.merged.names) if self.merged else []
        return f"nf={self.out_features}, nx={self.in_features}, active={list(self.active)}, merged={merged}"


class HFConv1DKind(LinearKind):
    """transformers' ``transformers.pytorch_utils.Conv1D`` (and subclasses keeping its forward)."""

    name = "conv1d_hf"
    adapts_as = "linear"
    linear = True
    host_class = AdaptedConv1D
    label = "transformers' Conv1D"

    def recognise(self, module: nn.Module) -> bool:
        cls = _conv1d_class()
        return cls is not None and isinstance(module, cls)

    def refusal(self, module: nn.Module) -> str | None:
        cls = _conv1d_class()
        if type(module).forward is not cls.forward:
            return f"{type(module).__name__} overrides Conv1D's forward"
        return None

    def dims(self, module: nn.Module) -> tuple[int, int]:
        if hasattr(module, "nf") and hasattr(module, "nx"):
            return int(module.nf), int(module.nx)
        d_in, d_out = module.weight.shape
        return d_out, d_in

    def weight_view(self, stored: Tensor) -> Tensor:
        return stored.t()

    def example(self, d_in: int, d_out: int, bias: bool, dtype: torch.dtype) -> nn.Module:
        from transformers.pytorch_utils import Conv1D

        m = Conv1D(d_out, d_in)
        nn.init.normal_(m.weight, std=d_in**-0.5)
        nn.init.normal_(m.bias, std=0.1)
        return m.to(dtype)
