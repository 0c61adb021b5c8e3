"""The host module: one base layer plus its named adapters.

``AdaptedLinear`` takes the place of an ``nn.Linear`` in the model. It holds the base layer's own
``weight`` and ``bias`` *parameter objects* under the same names, so the model's state-dict keys
and tensors for the base stay exactly as they were (a base checkpoint still loads), and adapters
live under ``<layer>.adapters.<name>.*``. The original module object is remembered (not as a
child) and put back by eject.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MergeError
from .exact import Residual, acc_dtype, apply_update, fingerprint, revert_update

if TYPE_CHECKING:
    from ..variant import Variant


def is_supported(module: nn.Module) -> bool:
    """True for layers lorazoo can wrap: ``nn.Linear`` and subclasses that keep its forward."""
    if isinstance(module, AdaptedLinear):
        return True
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def fusable(cls: type) -> bool:
    """True when adapters of ``cls`` may take the fused forward path.

    The fused path computes ``y += s·(drop(x)·Aᵀ)·Bᵀ`` in one ``addmm_`` on the base output
    (no separate scale and add passes over the ``d_out``-sized output). It is only valid for
    a contribution that is exactly :class:`~lorazoo.LowRankAdapter`'s, so a variant qualifies
    only by keeping that class's ``forward`` and ``lowrank_out`` untouched; overriding either
    (DoRA) selects the general path, and a subclass can also opt out with
    ``fused_forward = False``.
    """
    from ..variant import LowRankAdapter

    return (
        issubclass(cls, LowRankAdapter)
        and cls.forward is LowRankAdapter.forward
        and cls.lowrank_out is LowRankAdapter.lowrank_out
        and getattr(cls, "fused_forward", True) is not False
    )


def owns_output(cls: type) -> bool:
    """True when adapters of ``cls`` produce the whole layer output themselves
    (:meth:`~lorazoo.Variant.output` overridden); the engine lets them when they run alone."""
    from ..variant import Variant

    return issubclass(cls, Variant) and cls.output is not Variant.output


def _fast_applies(adapter: Variant, x: Tensor, y: Tensor) -> bool:
    """Per call: the fused path needs one dtype and device throughout, no autocast (which
    would change the dtypes the general path computes in) and a contiguous output."""
    A = adapter.lora_A
    return (
        A.dtype == y.dtype == x.dtype
        and A.device == y.device
        and y.is_contiguous()
        and not torch.is_autocast_enabled(y.device.type)
    )


@dataclass
class MergeState:
    """What a host remembers while adapters are merged into its weight."""

    names: tuple[str, ...]
    row_scales: list[Tensor | None]
    residual: Residual
    adapter_print: tuple
    weight_print: tuple


@dataclass
class BasePatch:
    """A reversible rewrite of the base weight made by a variant (OLoRA's ``W − s·B₀A₀``)."""

    owner: str
    B: Tensor
    A: Tensor
    row_scale: Tensor | None
    residual: Residual = field(repr=False)


class AdaptedLinear(nn.Module):
    """An ``nn.Linear`` with named adapters beside it.

    ``forward(x) = W x + b + Σ_{active, unmerged} c_a(x)``.
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        if base.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = base.bias
        self.adapters = nn.ModuleDict()
        self._origin = (base,)  # a tuple, so nn.Module does not register it as a child
        self.active: tuple[str, ...] = ()
        self.merged: MergeState | None = None
        self.patches: list[BasePatch] = []
        self._run: tuple[Variant, ...] = ()  # adapters the forward applies
        self._fusable: frozenset[Variant] = frozenset()  # those that may take the fused path
        self._solo: Variant | None = None  # the only adapter run, when it overrides ``output``
        self.register_load_state_dict_post_hook(_ignore_missing_adapter_keys)

    # ---- state ---------------------------------------------------------------------------------

    @property
    def original(self) -> nn.Linear:
        return self._origin[0]

    def _refresh(self) -> None:
        merged = self.merged.names if self.merged else ()
        self._run = tuple(self.adapters[n] for n in self.active if n not in merged)
        self._fusable = frozenset(a for a in self._run if fusable(type(a)))
        self._solo = self._run[0] if len(self._run) == 1 and owns_output(type(self._run[0])) else None

    def add_adapter(self, name: str, adapter: Variant, active: bool = True) -> None:
        if name in self.adapters:
            raise MergeError(f"layer already has an adapter named {name!r}")
        self.adapters[name] = adapter
        if active:
            self.active = (*self.active, name)
        self._refresh()

    def remove_adapter(self, name: str) -> Variant:
        if self.merged and name in self.merged.names:
            raise MergeError(f"adapter {name!r} is merged; unmerge before removing it")
        if any(p.owner == name for p in self.patches):
            raise MergeError(f"adapter {name!r} still has a base rewrite; unpatch it first")
        adapter = self.adapters[name]
        del self.adapters[name]
        self.active = tuple(n for n in self.active if n != name)
        self._refresh()
        return adapter

    def set_active(self, names: Sequence[str]) -> None:
        self.active = tuple(n for n in names if n in self.adapters)
        self._refresh()

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged is not None and self.training and torch.is_grad_enabled():
            self._refuse_training_while_merged()
        if not self._run:
            return y
        if self._solo is not None:
            # ``y`` is fresh and referenced by nothing else (the base product's backward needs
            # only ``x`` and ``W``), so the adapter may finish it in place.
            return self._solo.output(x, y, self)
        out = y
        fast: list[Variant] = []
        for adapter in self._run:
            if adapter in self._fusable and _fast_applies(adapter, x, y):
                fast.append(adapter)
            else:
                out = out + adapter(x, y, self).to(y.dtype)
        if fast:
            # Only now may the output be changed in place: general adapters above saw the base
            # output unchanged (and may have saved it for backward); ``out`` is either their
            # fresh sum or ``y``, which the base layer's backward does not need.
            flat = out.view(-1, self.out_features)
            x2 = x.reshape(-1, self.in_features)
            for adapter in fast:
                h = F.linear(adapter.dropout(x2), adapter.lora_A)
                flat.addmm_(h, adapter.lora_B.t(), alpha=adapter.scale)
        return out

    def _refuse_training_while_merged(self) -> None:
        assert self.merged is not None
        for name in self.merged.names:
            if any(p.requires_grad for p in self.adapters[name].parameters()):
                raise MergeError(
                    f"adapter {name!r} is merged into the weights, so training would not reach "
                    "it: call lorazoo.unmerge(model) before training, or model.eval() / "
                    "torch.no_grad() for inference"
                )

    # ---- merge --------------------------------------------------------------------------------

    def _factors(
        self, names: Sequence[str], row_scales: Sequence[Tensor | None] | None
    ) -> tuple[Tensor, Tensor, Tensor | None, list[Tensor | None]]:
        """Stacked ``(B_c, A_c, g)`` with ``ΣΔW_a(W) = (g − 1)⊙W + B_c·A_c`` and the per-adapter
        row factors. With ``row_scales`` given (unmerge), those are used instead of asking the
        adapters again (DoRA's factor depends on the pre-merge weight)."""
        acc = acc_dtype(self.weight.dtype)
        weight = self.weight.detach()
        Bs, As, scales = [], [], []
        g: Tensor | None = None
        for i, name in enumerate(names):
            adapter = self.adapters[name]
            lr = adapter.lowrank(weight if row_scales is None else None)
            c = lr.row_scale if row_scales is None else row_scales[i]
            if c is not None:
                c = c.detach().to(acc).clone() if row_scales is None else c
            B = lr.B.detach().to(acc) * lr.scale
            if c is not None:
                B = B * c.unsqueeze(1)
                g = (c - 1) if g is None else g + (c - 1)
            Bs.append(B)
            As.append(lr.A.detach().to(acc))
            scales.append(c)
        if g is not None:
            g = g + 1
        return torch.cat(Bs, dim=1), torch.cat(As, dim=0), g, scales

    def _adapter_print(self, names: Sequence[str]) -> tuple:
        tensors = [t for n in names for t in (*self.adapters[n].parameters(), *self.adapters[n].buffers())]
        return fingerprint(*tensors)

    @torch.no_grad()
    def merge(self, names: Sequence[str]) -> MergeState:
        """Fold ``names`` into the weight; the weight comes back bit-exactly on :meth:`unmerge`."""
        if self.merged is not None:
            raise MergeError(f"adapters {list(self.merged.names)} are already merged; unmerge first")
        names = tuple(names)
        if not names:
            raise MergeError("nothing to merge")
        B, A, g, scales = self._factors(names, None)
        residual = apply_update(self.weight.data, B, A, g)
        self._wrote_weight()
        self.merged = MergeState(
            names=names,
            row_scales=scales,
            residual=residual,
            adapter_print=self._adapter_print(names),
            weight_print=fingerprint(self.weight),
        )
        self._refresh()
        return self.merged

    def _changed_while_merged(self) -> list[str]:
        state = self.merged
        assert state is not None
        changed = []
        if self._adapter_print(state.names) != state.adapter_print:
            changed.append(f"adapter tensors of {list(state.names)}")
        if fingerprint(self.weight) != state.weight_print:
            changed.append("the merged base weight")
        return changed

    def check_unmerge(self, exact: bool = True, where: str = "this layer") -> None:
        """Raise :class:`MergeError` if :meth:`unmerge` would refuse."""
        if self.merged is None:
            raise MergeError(f"nothing is merged into {where}")
        changed = self._changed_while_merged()
        if changed and exact:
            raise MergeError(
                f"{' and '.join(changed)} changed while merged into {where}, so the exact "
                "unmerge cannot reproduce the merge; call unmerge(..., exact=False) to subtract "
                "the current update instead (the base then comes back within rounding, not bit "
                "for bit)"
            )

    @torch.no_grad()
    def unmerge(self, exact: bool = True) -> None:
        """Take merged adapters back out, restoring the weight bit for bit. ``exact=False``
        allows plain subtraction when adapter or base tensors changed while merged."""
        self.check_unmerge(exact)
        state = self.merged
        assert state is not None
        changed = self._changed_while_merged()
        B, A, g, _ = self._factors(state.names, state.row_scales)
        revert_update(self.weight.data, B, A, g, None if changed else state.residual)
        self._wrote_weight()
        self.merged = None
        self._refresh()

    def _wrote_weight(self) -> None:
        """Writes through ``weight.data`` do not move the weight's version counter; move it, so
        anything keyed on the version (a variant's cache, autograd's check that a tensor saved
        for backward is unchanged) sees merges and base rewrites like any in-place change."""
        torch.autograd.graph.increment_version(self.weight)

    # ---- base rewrites (variant.prepare_base) -------------------------------------------------

    @torch.no_grad()
    def patch_base(self, owner: str, B: Tensor, A: Tensor, row_scale: Tensor | None = None) -> None:
        """``W ← cast(row_scale ⊙ W + B·A)``, reverted bit-exactly by :meth:`unpatch_base`."""
        if self.merged is not None:
            raise MergeError("cannot rewrite the base weight while adapters are merged")
        acc = acc_dtype(self.weight.dtype)
        B = B.detach().to(acc).clone()
        A = A.detach().to(acc).clone()
        g = row_scale.detach().to(acc).clone() if row_scale is not None else None
        residual = apply_update(self.weight.data, B, A, g)
        self._wrote_weight()
        self.patches.append(BasePatch(owner, B, A, g, residual))

    def _patch_tail(self, owner: str) -> int:
        """Index where ``owner``'s rewrites start; they must be the newest ones (they stack)."""
        tail = len(self.patches)
        while tail > 0 and self.patches[tail - 1].owner == owner:
            tail -= 1
        if any(p.owner == owner for p in self.patches[:tail]):
            first = next(i for i, p in enumerate(self.patches) if p.owner == owner)
            later = sorted({p.owner for p in self.patches[first:]} - {owner})
            raise MergeError(f"adapter {owner!r} rewrote the base weight before {later}; eject those first")
        return tail

    def check_unpatch(self, owner: str) -> None:
        self._patch_tail(owner)

    @torch.no_grad()
    def unpatch_base(self, owner: str) -> None:
        """Revert ``owner``'s base rewrites bit-exactly."""
        tail = self._patch_tail(owner)
        for p in reversed(self.patches[tail:]):
            revert_update(self.weight.data, p.B, p.A, p.row_scale, p.residual)
        if tail < len(self.patches):
            self._wrote_weight()
        del self.patches[tail:]

    def extra_repr(self) -> str:
        merged = list(self.merged.names) if self.merged else []
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, active={list(self.active)}, merged={merged}"
        )


def _ignore_missing_adapter_keys(module: AdaptedLinear, incompatible) -> None:
    """Loading a base checkpoint into an adapted model: adapter tensors are not in it, and
    that is expected. Other missing keys are still reported."""
    suffixes = tuple(f"adapters.{k}" for k in module.adapters.state_dict())
    if not suffixes:
        return
    keep = [k for k in incompatible.missing_keys if not k.endswith(suffixes)]
    incompatible.missing_keys[:] = keep
