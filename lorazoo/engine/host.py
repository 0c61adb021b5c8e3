"""The host: one base layer plus its named adapters, whatever the layer's kind.

A host takes the place of a supported layer in the model. ``AdaptedLayer`` is the machinery every
kind shares: the adapters and which are active (inactive ones parked), routed batches, the exact
merge and unmerge, reversible base rewrites, and casts with merges in place. Each layer kind
(:mod:`lorazoo.engine.kinds`) subclasses it with what depends on the layer: its forward, the
``d_out × d_in`` view of its weight variants read (``weight_view``) and the layout a merge writes
in (``merge_layout``).

The host holds the base layer's own tensors (``weight`` and ``bias``, or what the kind names)
*as the same objects* under the same names, so the model's state-dict keys and tensors for the
base stay exactly as they were (a base checkpoint still loads), and adapters live under
``<layer>.adapters.<name>.*``. The original module object is remembered (not as a child) and put
back by eject.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from ..errors import MergeError, RoutingError
from ..variant import PlainLowRank, Variant, fusable
from . import _interrupt
from .distributed import bump_version, gathered, local_update, local_view
from .exact import (
    Residual,
    acc_dtype,
    apply_update,
    content_sum,
    fingerprint,
    revert_update,
    same_print,
)

if TYPE_CHECKING:
    from .kinds import LayerKind


def owns_output(cls: type) -> bool:
    """True when adapters of ``cls`` produce the whole layer output themselves
    (:meth:`~lorazoo.Variant.output` overridden); the engine lets them when they run alone."""
    return issubclass(cls, Variant) and cls.output is not Variant.output


@dataclass(frozen=True, eq=False)
class Route:
    """One adapter's rows in a routed batch: their indices, and ``(start, stop)`` when they are
    one contiguous run (then read and written as slices, without gathers)."""

    adapter: Variant
    rows: Tensor
    span: tuple[int, int] | None = None

    def take(self, t: Tensor) -> Tensor:
        """The route's rows of ``t``: a slice (a view) for a contiguous run, else a gather."""
        return t[self.span[0] : self.span[1]] if self.span is not None else t.index_select(0, self.rows)


def _add_rows(y: Tensor, route: Route, c: Tensor, alpha: float = 1.0) -> None:
    """``y[rows] += alpha·c`` in place."""
    c = c.to(y.dtype)
    if route.span is not None:
        y[route.span[0] : route.span[1]].add_(c, alpha=alpha)
    else:
        y.index_add_(0, route.rows, c, alpha=alpha)


@dataclass
class MergeState:
    """What a host remembers while adapters are merged into its weight.

    ``factors`` are the update exactly as applied (``B_c``, ``A_c``, ``g`` in the stored
    weight's layout, in the accumulation dtype): the unmerge reverts with them, so it stays exact
    when the adapters change while merged (an optimizer step), and they cost adapter-sized
    memory. ``weight_print`` is a fast check that the weight was not touched since; when it does
    not match (a copy, a pickle round trip, a move, an inference tensor), the weight's contents
    are compared with the checksum of what the merge wrote (``residual.merged_sum``)."""

    names: tuple[str, ...]
    row_scales: list[Tensor | None]
    residual: Residual
    factors: tuple[Tensor, Tensor, Tensor | None]
    weight_print: tuple
    dtype: torch.dtype


@dataclass
class BasePatch:
    """A reversible rewrite of the base weight made by a variant (OLoRA's ``W − s·B₀A₀``), its
    factors in the layout of the host's ``merge_target()``."""

    owner: str
    B: Tensor
    A: Tensor
    row_scale: Tensor | None
    residual: Residual = field(repr=False)
    dtype: torch.dtype | None = None  # the weight dtype the residual is for


def _weight_writes(weight: Tensor) -> contextlib.AbstractContextManager:
    """The context the engine writes ``weight`` in: an inference tensor (made under
    ``torch.inference_mode()``) can only be changed in place in inference mode."""
    return torch.inference_mode() if weight.is_inference() else contextlib.nullcontext()


def _move(t: Tensor | None, device: torch.device) -> Tensor | None:
    return None if t is None else t.to(device)


def _moved_residual(res: Residual, device: torch.device) -> Residual:
    if res.wide_index.device == device:
        return res
    return Residual(
        res.numel,
        _move(res.dense, device),
        _move(res.index, device),
        _move(res.values, device),
        res.wide_index.to(device),
        res.wide_bits.to(device),
        res.merged_sum,
    )


def fast_applies(f: PlainLowRank, x: Tensor, y: Tensor) -> bool:
    """Per call: the fused (in-place) path needs one dtype and device throughout, no autocast
    (which would change the dtypes the general path computes in) and a contiguous output."""
    A = f.A
    return (
        A.dtype == y.dtype == x.dtype
        and A.device == y.device
        and y.is_contiguous()
        and not torch.is_autocast_enabled(y.device.type)
    )


class AdaptedLayer(nn.Module):
    """A supported layer with named adapters beside it (the kind-independent part of a host).

    ``forward(x) = base(x) + Σ_{active, unmerged} c_a(x)``; a kind's subclass supplies
    :meth:`forward` and :meth:`_add_routes`, and may change :meth:`weight_view` and
    :meth:`merge_layout`.
    """

    # the base module's tensors the host holds under the same names (parameters or buffers)
    base_tensors: ClassVar[tuple[str, ...]] = ("weight", "bias")
    # the one of them that holds the weight (what merges and base rewrites change)
    weight_name: ClassVar[str] = "weight"
    # False: a kind whose layout cannot take a row-scaling update (c ⊙_row W) refuses it
    row_scales: ClassVar[bool] = True
    # False: base rewrites (``patch_base``) are refused
    base_rewrites: ClassVar[bool] = True
    _min_route_dim = 2  # a routed input has a batch dimension before the features

    def __init__(self, base: nn.Module, kind: LayerKind):
        super().__init__()
        self.out_features, self.in_features = kind.dims(base)
        for name in self.base_tensors:
            if name in base._parameters:
                self.register_parameter(name, base._parameters[name])
            elif name in base._buffers:
                persistent = name not in base._non_persistent_buffers_set
                self.register_buffer(name, base._buffers[name], persistent=persistent)
            else:
                self.register_parameter(name, None)
        if "bias" not in self._parameters and "bias" not in self._buffers:
            self.register_parameter("bias", None)  # variants read ``host.bias``
        self.adapters = nn.ModuleDict()
        self._origin = (base,)  # a tuple, so nn.Module does not register it as a child
        self._kind = (kind,)
        self.active: tuple[str, ...] = ()
        self.merged: MergeState | None = None
        self.patches: list[BasePatch] = []
        self._run: tuple[Variant, ...] = ()  # adapters the forward applies
        self._fusable: frozenset[Variant] = frozenset()  # those with plain low-rank factors
        self._solo: Variant | None = None  # the only adapter run, when it overrides ``output``
        # While a batch is routed (lorazoo.route): its row count and, per adapter, its row
        # indices and (start, stop) when those rows are one contiguous run
        self._routes: tuple[int, tuple[Route, ...]] | None = None
        # Inactive adapters are parked: their tensors frozen, and here, per adapter, the
        # ``requires_grad`` each had before, given back when the adapter is active again.
        self._parked: dict[str, dict[str, bool]] = {}
        self.register_load_state_dict_post_hook(_ignore_missing_adapter_keys)

    # ---- the layer ---------------------------------------------------------------------------

    @property
    def kind(self) -> LayerKind:
        """The :class:`~lorazoo.engine.kinds.LayerKind` this host wraps."""
        return self._kind[0]

    @property
    def original(self) -> nn.Module:
        return self._origin[0]

    @property
    def stored_weight(self) -> Tensor:
        """The tensor the layer stores its weight in, in its own layout (the one merges and base
        rewrites change; the state dict holds it)."""
        name = self.weight_name
        t = self._parameters.get(name)
        return t if t is not None else self._buffers[name]

    def weight_view(self) -> Tensor:
        """The base weight as the ``d_out × d_in`` matrix variants see. Default: the stored
        weight itself (a linear layer's layout)."""
        return self.stored_weight

    def merge_target(self) -> Tensor:
        """The tensor merges and base rewrites write (``target ← g ⊙_row target + B·A`` with the
        factors :meth:`orient` gives); it shares memory with the stored weight. Default: the
        stored weight."""
        return self.stored_weight

    def orient(self, B: Tensor, A: Tensor, g: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """The update ``g ⊙_row W + B·A``, factors given in the ``d_out × d_in`` view, in
        :meth:`merge_target`'s layout. Default: as they are."""
        return B, A, g

    def hand_back(self) -> None:
        """Give the base tensors back to the original module (eject)."""
        original = self.original
        for name in self.base_tensors:
            t = self._parameters.get(name) if name in self._parameters else self._buffers.get(name)
            if name in original._buffers:
                original._buffers[name] = t
            else:
                original._parameters[name] = t

    def base_tensor_slots(self) -> list[tuple[dict, str]]:
        """``(dict, name)`` of each base tensor in the original module's own tables, which
        injection empties while the host holds them."""
        original = self.original
        out = []
        for name in self.base_tensors:
            for table in (original._parameters, original._buffers):
                if name in table:
                    out.append((table, name))
                    break
        return out

    # ---- state ---------------------------------------------------------------------------------

    def _refresh(self) -> None:
        merged = self.merged.names if self.merged else ()
        self._run = tuple(self.adapters[n] for n in self.active if n not in merged)
        self._fusable = frozenset(a for a in self._run if fusable(type(a)))
        solo = self._run[0] if len(self._run) == 1 and owns_output(type(self._run[0])) else None
        # A plain attribute, not a second registration of the child ``adapters.<name>`` (which
        # would repeat its tensors in the state dict under ``_solo.``).
        object.__setattr__(self, "_solo", solo)

    def add_adapter(self, name: str, adapter: Variant, active: bool = True) -> None:
        if name in self.adapters:
            raise MergeError(f"layer already has an adapter named {name!r}")
        self.adapters[name] = adapter
        if active:
            self.active = (*self.active, name)
        else:
            self._set_parked({*self._parked, name})
        self._refresh()

    def remove_adapter(self, name: str) -> Variant:
        if self.merged and name in self.merged.names:
            raise MergeError(f"adapter {name!r} is merged; unmerge before removing it")
        if any(p.owner == name for p in self.patches):
            raise MergeError(f"adapter {name!r} still has a base rewrite; unpatch it first")
        adapter = self.adapters[name]
        self._set_parked(set(self._parked) - {name})  # the adapter leaves with its own flags
        del self.adapters[name]
        self.active = tuple(n for n in self.active if n != name)
        self._refresh()
        return adapter

    def set_active(self, names: Sequence[str], park: bool = True) -> None:
        """Make ``names`` (those this layer carries) the active adapters.

        With ``park`` (the default), adapters left inactive are parked: every tensor of theirs
        gets ``requires_grad=False``, so no optimizer group, gradient hook or data-parallel
        wrapper expects a gradient they cannot get; an adapter that becomes active again gets
        back exactly the flags it had. ``park=False`` changes only what the forward applies
        (:func:`lorazoo.disabled`). Tensors of a variant's shared state are not parked.
        """
        active = tuple(n for n in names if n in self.adapters)
        if park:
            self._set_parked({n for n in self.adapters if n not in active})
        self.active = active
        self._refresh()

    def parked(self) -> frozenset[str]:
        """Names of the parked adapters (inactive, their tensors frozen: :meth:`set_active`)."""
        return frozenset(self._parked)

    def _set_parked(self, names: set[str]) -> None:
        """Park exactly ``names``, all or nothing: on any exception the flags are as before."""
        before = dict(self._parked)
        flags = [(p, p.requires_grad) for a in self.adapters.values() for _, p in _own_parameters(a)]
        try:
            for name in [n for n in self._parked if n not in names]:
                saved = self._parked.pop(name)
                for pname, p in _own_parameters(self.adapters[name]):
                    p.requires_grad_(saved.get(pname, p.requires_grad))
            for name in [n for n in names if n not in self._parked]:
                own = _own_parameters(self.adapters[name])
                self._parked[name] = {pname: p.requires_grad for pname, p in own}
                for _, p in own:
                    p.requires_grad_(False)
        except BaseException:
            for p, flag in flags:
                p.requires_grad_(flag)
            self._parked = before
            raise

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """``base_forward(x)`` plus each active, unmerged adapter's contribution. Plain low-rank
        adapters that may take the fused path (:func:`fast_applies`) are added in place by the
        kind's ``_add_fused`` after every other adapter has seen the base output unchanged; the
        others through the kind's ``_unfused``."""
        y = self.base_forward(x)
        if self.merged is not None and self.training and torch.is_grad_enabled():
            self._refuse_training_while_merged()
        if self._routes is not None:
            return self._routed(x, y)
        if not self._run:
            return y
        if self._solo is not None:
            # ``y`` is fresh and referenced by nothing else (the base product's backward needs
            # only ``x`` and ``W``), so the adapter may finish it in place.
            return self._solo.output(x, y, self)
        out = y
        fast: list[PlainLowRank] = []
        for adapter in self._run:
            f = adapter.plain_lowrank() if adapter in self._fusable else None
            if f is not None and fast_applies(f, x, y):
                fast.append(f)
            else:
                out = out + self._unfused(adapter, x, y, f)
        if fast:
            # Only now may the output be changed in place: general adapters above saw the base
            # output unchanged (and may have saved it for backward); ``out`` is either their
            # fresh sum or ``y``, which the base layer's backward does not need.
            self._add_fused(out, x, fast)
        return out

    def base_forward(self, x: Tensor) -> Tensor:  # pragma: no cover - every kind defines it
        raise NotImplementedError(f"{type(self).__name__} does not define base_forward")

    def _unfused(
        self, adapter: Variant, x: Tensor, y: Tensor, f: PlainLowRank | None = None
    ) -> Tensor:  # pragma: no cover - every kind defines it
        """An adapter's contribution in the output's dtype, off the fused path."""
        raise NotImplementedError(f"{type(self).__name__} does not define _unfused")

    def _add_fused(self, out: Tensor, x: Tensor, fast: Sequence[PlainLowRank]) -> None:  # pragma: no cover
        """Add the contributions of ``fast`` (plain low-rank factors) to ``out`` in place."""
        raise NotImplementedError(f"{type(self).__name__} does not define _add_fused")

    def _add_routes(self, routes: Sequence[Route], x: Tensor, y: Tensor) -> None:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} does not route batches")

    def set_routes(
        self, rows: int | None, routes: Sequence[tuple[str, Tensor, tuple[int, int] | None]] = ()
    ) -> None:
        """Route a batch of ``rows`` rows: each ``(adapter name, row indices, span)`` applies
        that adapter to those rows only, whatever the active set (``span`` is ``(start, stop)``
        when the rows are one contiguous run, else None); rows in no route get the base output.
        ``rows=None`` ends routing. Used by :func:`lorazoo.route`."""
        if rows is None:
            self._routes = None
            return
        if self.merged is not None:
            raise MergeError("cannot route a batch through merged adapters; unmerge first")
        self._routes = (
            rows,
            tuple(Route(self.adapters[n], idx, span) for n, idx, span in routes if n in self.adapters),
        )

    def _routed(self, x: Tensor, y: Tensor) -> Tensor:
        """The routed output: the base output plus, for each route, the adapter's contribution
        on its rows (:meth:`_add_routes`).

        Routes cover disjoint rows, so each adds into ``y`` in place (``y`` is fresh and the base
        product's backward does not need it): a route reads only its own rows, which no earlier
        route has touched, and the output is never copied whole."""
        assert self._routes is not None
        rows, routes = self._routes
        if x.dim() < self._min_route_dim or x.shape[0] != rows:
            raise RoutingError(
                f"the routed batch has {rows} rows, but this layer's input has shape "
                f"{tuple(x.shape)}: the first dimension must be the batch the routes were made for"
            )
        self._add_routes([Route(r.adapter, r.rows.to(y.device), r.span) for r in routes], x, y)
        return y

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
        row factors. With ``row_scales`` given, those are used instead of asking the adapters
        again (DoRA's factor depends on the pre-merge weight). The unmerge does not call this: it
        reverts with the factors kept in :class:`MergeState`."""
        acc = acc_dtype(self.stored_weight.dtype)
        weight = self.weight_view().detach()
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

    @torch.no_grad()
    def merge(self, names: Sequence[str], *, interruptible: bool = True) -> MergeState:
        """Fold ``names`` into the weight; the weight comes back bit-exactly on :meth:`unmerge`.
        All or nothing: on any exception (an interrupt included) the weight is left as it was
        and nothing is recorded as merged."""
        if self.merged is not None:
            raise MergeError(f"adapters {list(self.merged.names)} are already merged; unmerge first")
        if self._routes is not None:
            raise MergeError("cannot merge while a batch is routed (inside lorazoo.route)")
        names = tuple(names)
        if not names:
            raise MergeError("nothing to merge")
        with gathered(self):  # sharded (FSDP2): the factors from whole tensors
            B, A, g, scales = self._factors(names, None)
        weight = self.merge_target()
        # this process's rows of the update (all of it unless sharded); unmerge reverts with them
        factors = local_update(weight, *self.orient(B, A, g))[1:]
        state = MergeState(names, scales, None, factors, (), weight.dtype)  # type: ignore[arg-type]
        try:
            with _weight_writes(weight):
                state.residual = apply_update(local_view(weight).data, *factors, interruptible=interruptible)
            if interruptible:
                _interrupt.checkpoint()
            self._wrote_weight()
            state.weight_print = fingerprint(weight)
            self.merged = state
            self._refresh()
        except BaseException:
            if state.residual is not None:
                with _weight_writes(weight):
                    revert_update(local_view(weight).data, *factors, state.residual, interruptible=False)
                self._wrote_weight()
            self.merged = None
            self._refresh()
            raise
        return state

    def _changed_while_merged(self) -> list[str]:
        """What changed since the merge that makes the exact unmerge impossible."""
        state = self.merged
        assert state is not None
        weight = self.merge_target()
        if weight.dtype != state.dtype:
            return [f"the merged base weight's dtype (merged as {state.dtype}, now {weight.dtype})"]
        if same_print(fingerprint(weight), state.weight_print):
            return []
        if content_sum(local_view(weight)) != state.residual.merged_sum:
            return ["the merged base weight"]
        state.weight_print = fingerprint(weight)  # same contents (a copy or a move): trust it again
        return []

    def check_unmerge(self, exact: bool = True, where: str = "this layer") -> None:
        """Raise :class:`MergeError` if :meth:`unmerge` would refuse."""
        if self.merged is None:
            raise MergeError(f"nothing is merged into {where}")
        if not exact:
            return
        changed = self._changed_while_merged()
        if changed:
            raise MergeError(
                f"{' and '.join(changed)} changed while merged into {where} (it is no longer what "
                "the merge wrote), so the base cannot be restored bit for bit. Restore the merged "
                "weight and unmerge again, or call unmerge(..., exact=False): that subtracts the "
                "merged update from the weight as it is now, which keeps your change to the "
                "weight and is exact only to rounding"
            )

    @torch.no_grad()
    def unmerge(self, exact: bool = True, *, interruptible: bool = True) -> MergeState:
        """Take merged adapters back out, restoring the weight bit for bit, with the update as it
        was merged (the adapters may have changed since). ``exact=False`` also allows it when the
        weight itself changed while merged: the update is then subtracted from the weight as it
        is (within rounding). All or nothing; returns the state it removed."""
        self.check_unmerge(exact)
        state = self.merged
        assert state is not None
        weight = self.merge_target()
        if weight.device != state.factors[0].device:
            state = self._moved_state(state, weight.device)
        exact_now = not self._changed_while_merged() if not exact else True
        residual = state.residual if exact_now else None
        before = None if residual is not None else content_sum(local_view(weight))
        try:
            with _weight_writes(weight):
                revert_update(local_view(weight).data, *state.factors, residual, interruptible=interruptible)
            if interruptible:
                _interrupt.checkpoint()
            self._wrote_weight()
            self.merged = None
            self._refresh()
        except BaseException:
            # The revert itself is all or nothing; whether it went through, the contents say.
            now = content_sum(local_view(weight))
            if residual is not None:
                if now != state.residual.merged_sum:  # reverted: merge again, bit for bit
                    with _weight_writes(weight):
                        apply_update(local_view(weight).data, *state.factors, interruptible=False)
                state.weight_print = fingerprint(weight)
                self.merged = state
            else:  # an arithmetic undo cannot be re-done exactly: if it went through, keep it
                self.merged = None if now != before else state
            self._wrote_weight()
            self._refresh()
            raise
        return state

    @torch.no_grad()
    def remerge(self, state: MergeState) -> None:
        """Put back a merge that :meth:`unmerge` took out, bit for bit (the weight must be the
        one that unmerge restored). Used to roll back an interrupted model-wide change."""
        weight = self.merge_target()
        with _weight_writes(weight):
            res = apply_update(local_view(weight).data, *state.factors, interruptible=False)
        self._wrote_weight()
        state.residual = res
        state.weight_print = fingerprint(weight)
        self.merged = state
        self._refresh()

    @staticmethod
    def _moved_state(state: MergeState, device: torch.device) -> MergeState:
        B, A, g = state.factors
        state.factors = (B.to(device), A.to(device), _move(g, device))
        state.residual = _moved_residual(state.residual, device)
        return state

    def _wrote_weight(self) -> None:
        """Writes through ``weight.data`` do not move the weight's version counter; move it, so
        anything keyed on the version (a variant's cache, autograd's check that a tensor saved
        for backward is unchanged) sees merges and base rewrites like any in-place change.
        (An inference tensor has no version counter.)"""
        weight = self.stored_weight
        if not weight.is_inference():
            bump_version(weight)

    # ---- base rewrites (variant.prepare_base) -------------------------------------------------

    @torch.no_grad()
    def patch_base(self, owner: str, B: Tensor, A: Tensor, row_scale: Tensor | None = None) -> None:
        """``W ← cast(row_scale ⊙ W + B·A)``, reverted bit-exactly by :meth:`unpatch_base`.
        All or nothing."""
        if self.merged is not None:
            raise MergeError("cannot rewrite the base weight while adapters are merged")
        if not self.base_rewrites:
            raise MergeError(
                f"adapter {owner!r} rewrites the base weight, which {self.kind.name} layers do not support"
            )
        self._patch(owner, *self.orient(B, A, row_scale))

    def _patch(self, owner: str, B: Tensor, A: Tensor, row_scale: Tensor | None) -> None:
        """:meth:`patch_base` with factors already in :meth:`merge_target`'s layout."""
        weight = self.merge_target()
        acc = acc_dtype(weight.dtype)
        B = B.detach().to(acc).contiguous().clone()
        A = A.detach().to(acc).contiguous().clone()
        g = row_scale.detach().to(acc).contiguous().clone() if row_scale is not None else None
        patch = BasePatch(owner, B, A, g, None, weight.dtype)  # type: ignore[arg-type]
        try:
            with _weight_writes(weight):
                patch.residual = apply_update(weight.data, B, A, g)
            _interrupt.checkpoint()
            self._wrote_weight()
            self.patches.append(patch)
        except BaseException:
            if patch.residual is not None:
                if self.patches and self.patches[-1] is patch:
                    self.patches.pop()
                with _weight_writes(weight):
                    revert_update(weight.data, B, A, g, patch.residual, interruptible=False)
                self._wrote_weight()
            raise

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
        tail = self._patch_tail(owner)
        for p in self.patches[tail:]:
            if p.dtype is not None and p.dtype != self.stored_weight.dtype:
                raise MergeError(
                    f"the base weight was rewritten by {owner!r} as {p.dtype} but is now "
                    f"{self.stored_weight.dtype}, cast outside Module.to/half/double (which take the "
                    "rewrite out and put it back around the cast); cast it back to undo the rewrite"
                )

    @torch.no_grad()
    def unpatch_base(self, owner: str, *, interruptible: bool = True) -> list[BasePatch]:
        """Revert ``owner``'s base rewrites bit-exactly; returns them (newest last). All or
        nothing: interrupted between two rewrites, the reverted ones are re-applied."""
        self.check_unpatch(owner)
        tail = self._patch_tail(owner)
        weight = self.merge_target()
        before = list(self.patches)
        try:
            for p in reversed(before[tail:]):
                if interruptible:
                    _interrupt.checkpoint()
                self._move_patch(p)
                with _weight_writes(weight):
                    revert_update(weight.data, p.B, p.A, p.row_scale, p.residual, interruptible=interruptible)
                self.patches.pop()
            if interruptible:
                _interrupt.checkpoint()
        except BaseException:
            # Each revert is all or nothing; the newest rewrite still listed may have been
            # reverted just before the exception, which the weight's contents tell.
            if len(self.patches) > tail and content_sum(weight) != self.patches[-1].residual.merged_sum:
                self.patches.pop()
            self.repatch(before[len(self.patches) :])
            raise
        finally:
            if len(self.patches) != len(before):
                self._wrote_weight()
        return before[tail:]

    @torch.no_grad()
    def repatch(self, patches: Sequence[BasePatch]) -> None:
        """Put back rewrites :meth:`unpatch_base` took out (oldest first), bit for bit."""
        weight = self.merge_target()
        for p in patches:
            if self.patches and self.patches[-1] is p:
                continue
            with _weight_writes(weight):
                p.residual = apply_update(weight.data, p.B, p.A, p.row_scale, interruptible=False)
            self.patches.append(p)
        if patches:
            self._wrote_weight()

    def _move_patch(self, p: BasePatch) -> None:
        device = self.stored_weight.device
        if p.B.device != device:
            p.B, p.A, p.row_scale = p.B.to(device), p.A.to(device), _move(p.row_scale, device)
            p.residual = _moved_residual(p.residual, device)

    # ---- casts and moves ----------------------------------------------------------------------

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """``.to()``, ``.half()``, ``.double()``, ``.cuda()``... with merges and base rewrites in
        place. A move keeps them (their records follow the weight on the next use). A cast of
        the weight's dtype takes them out first (exactly, in the old dtype), casts the original
        weight, and puts them back in the new dtype: unmerge and eject then give the cast of the
        original weight bit for bit, and the rewritten base is re-derived in the new dtype."""
        if self.merged is None and not self.patches:
            return super()._apply(fn, recurse)
        w = self.stored_weight
        probe = fn(torch.empty(0, dtype=w.dtype, device=w.device))
        if not isinstance(probe, Tensor) or probe.dtype == w.dtype:
            return super()._apply(fn, recurse)
        state = self.merged
        if state is not None:
            self.unmerge()
        patches: list[BasePatch] = []
        try:
            for owner in reversed(list(dict.fromkeys(p.owner for p in self.patches))):
                patches[:0] = self.unpatch_base(owner, interruptible=False)
        except BaseException:
            self.repatch(patches)
            if state is not None:
                self.remerge(state)
            raise
        out = super()._apply(fn, recurse)
        for p in patches:  # their factors are in the stored layout already
            self._patch(p.owner, p.B, p.A, p.row_scale)
        if state is not None:
            self.merge(state.names)
        return out

    def extra_repr(self) -> str:
        merged = list(self.merged.names) if self.merged else []
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, active={list(self.active)}, merged={merged}"
        )


def _own_parameters(adapter: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """An adapter's parameters, without those of state shared with other adapters."""
    return [(n, p) for n, p in adapter.named_parameters() if not n.startswith("shared.")]


def _ignore_missing_adapter_keys(module: AdaptedLayer, incompatible) -> None:
    """Loading a base checkpoint into an adapted model: adapter tensors are not in it, and
    that is expected. Other missing keys are still reported."""
    suffixes = tuple(f"adapters.{k}" for k in module.adapters.state_dict())
    if not suffixes:
        return
    keep = [k for k in incompatible.missing_keys if not k.endswith(suffixes)]
    incompatible.missing_keys[:] = keep
