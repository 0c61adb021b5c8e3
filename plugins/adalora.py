"""AdaLoRA (Zhang et al., ICLR 2023, arXiv 2303.10512): an SVD-form update whose ranks are
allocated across the model during training.

Per adapted layer ``ΔW = P·Λ·Q`` with ``Q = lora_A`` (``r × d_in``), ``Λ = diag(lora_E)``
(``lora_E`` is ``r × 1``, zeros at start) and ``P = lora_B`` (``d_out × r``); the layer computes
``W x + s·B·((A ⊙ E)·drop(x))`` with ``s = α / (init_r + 1e-5)``. Tensor names, shapes and the
scale follow PEFT's layout, so the tensors interoperate.

**Importance.** For every entry ``w`` of ``A``, ``E`` and ``B``: sensitivity ``I = |w·∂L/∂w|``,
smoothed ``Ī ← β₁Ī + (1 − β₁)I``, uncertainty ``Ū ← β₂Ū + (1 − β₂)|I − Ī|`` (with the new ``Ī``),
importance ``s = Ī·Ū``, all kept in fp32 whatever the adapter dtype. Triplet ``i`` of a layer
scores ``S_i = s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)``.

**Budget.** ``b⁽⁰⁾ = init_r·n`` and ``b⁽ᵀ⁾ = target_r·n`` over the ``n`` layers of one injection.
At step ``t``: ``b⁽⁰⁾`` while ``t ≤ t_init``; then ``floor(b⁽ᵀ⁾ + (b⁽⁰⁾ − b⁽ᵀ⁾)(1 − (t − t_init) /
(T − t_final − t_init))³)``, masking every ``delta_t`` steps (PEFT's rounding and step counting);
at step ``T − t_final`` (the last step, ``T − 1``, when ``t_final = 0``) the final mask with
``b⁽ᵀ⁾``. A mask keeps exactly ``b`` triplets over all layers (ties go to the lower position,
layers in model order) and writes exact zeros into the others' ``E`` (which may regrow until the
final mask). After the final mask every layer *shrinks* its tensors, and the optimizer's state
for them, to the kept triplets: the model stops paying for pruned ranks, and a saved file holds
each layer's real rank, which :func:`lorazoo.load` reads back bit for bit.

**Per-step work** runs from the optimizer's hooks after ``lorazoo.attach(model, optimizer,
total_steps)`` (importance from the final gradients and the weights before the update, as the
paper defines it), or from ``lorazoo.after_step(model, step, total_steps=...)`` after
``optimizer.step()`` (weights after the update, as PEFT's ``update_and_allocate``). A model
trained for more than :data:`UNHOOKED_LIMIT` steps with neither raises
:class:`AdaLoraHooksError` once. The orthogonality penalty
``γ·Σ_layers (‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F)`` is ``lorazoo.extra_loss(model)``.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import lorazoo
from lorazoo import AdapterFileError, ConfigError, LorazooError
from lorazoo.claims import Claim, Compare, Ref
from lorazoo.plugin import iter_adapters

# A model whose adapter tensors were updated this many times by an optimizer with no per-step
# hook in between raises AdaLoraHooksError (once).
UNHOOKED_LIMIT = 5
EPS = 1e-5  # in the scale α / (init_r + EPS), as PEFT


class AdaLoraHooksError(LorazooError, RuntimeError):
    """An AdaLoRA model trained without its per-step hooks: the ranks would never change."""


class AdaLoraWarning(UserWarning):
    """AdaLoRA cannot run its schedule as configured (e.g. the training length is unknown)."""


def _int(name: str, value: object, low: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}; {hint}")


def _unit(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value < 1.0):
        raise ConfigError(
            f"{name} must be a number with 0 <= {name} < 1 (the paper uses 0.85), got {value!r}"
        )


def _compiling() -> bool:
    """True while torch.compile traces the forward."""
    check = getattr(torch.compiler, "is_compiling", None)
    return bool(check()) if check is not None else False


@dataclass(frozen=True)
class AdaLoraConfig(lorazoo.VariantConfig):
    """AdaLoRA's hyper-parameters (defaults: PEFT's, except the penalty, which is the paper's).

    ``r`` (12): the initial rank of every layer (PEFT's ``init_r``). ``alpha`` (8): ``s = α/(r +
    1e-5)``. ``target_r`` (None: ``max(1, floor(2r/3))``, 8 for ``r = 12``): the final average
    rank. ``t_init`` (0) steps at the full budget, ``t_final`` (0) steps at the final budget,
    ``delta_t`` (1) steps between masks. ``beta1``, ``beta2`` (0.85): the EMA factors of the
    sensitivity and the uncertainty. ``orth_reg_weight`` (0.1) and ``orth_reg_form``
    (``"paper"``: squared Frobenius norms summed over layers; ``"peft"``: unsquared norms averaged
    over tensors, PEFT's form, whose default weight is 0.5). ``total_steps`` (None): the training
    length, which may instead come later from :func:`lorazoo.attach` or
    :func:`lorazoo.after_step`.
    """

    r: int = 12
    alpha: float = 8.0
    target_r: int | None = None
    t_init: int = 0
    t_final: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    orth_reg_form: str = "paper"
    total_steps: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.target_r is not None:
            _int("target_r", self.target_r, 1, "it is the final average rank per layer")
            if self.target_r > self.r:
                raise ConfigError(
                    f"target_r={self.target_r} is larger than the initial rank r={self.r}; AdaLoRA "
                    f"only prunes, so use target_r <= {self.r} (the paper starts at 1.5 × target_r)"
                )
        _int("t_init", self.t_init, 0, "it counts the steps before the budget starts to fall")
        _int("t_final", self.t_final, 0, "it counts the steps trained at the final budget")
        _int("delta_t", self.delta_t, 1, "it is the number of steps between two masks")
        _unit("beta1", self.beta1)
        _unit("beta2", self.beta2)
        w = self.orth_reg_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w >= 0):
            raise ConfigError(f"orth_reg_weight must be a finite number >= 0 (paper: 0.1), got {w!r}")
        if self.orth_reg_form not in ("paper", "peft"):
            raise ConfigError(
                f"orth_reg_form must be 'paper' (squared, summed) or 'peft' (unsquared, averaged), "
                f"got {self.orth_reg_form!r}"
            )
        if self.total_steps is not None:
            check_schedule(self, self.total_steps)

    @property
    def final_r(self) -> int:
        """``target_r``, or its default ``max(1, floor(2r/3))``."""
        return self.target_r if self.target_r is not None else max(1, (2 * self.r) // 3)


def check_schedule(config: AdaLoraConfig, total_steps: object) -> int:
    """``total_steps`` as an int, after checking it leaves a budgeting phase (PEFT's rule:
    ``t_init < total_steps − t_final``)."""
    _int("total_steps", total_steps, 1, "it is the number of optimizer steps the training takes")
    assert isinstance(total_steps, int)
    if config.t_init >= total_steps - config.t_final:
        raise ConfigError(
            f"total_steps={total_steps} leaves no budgeting phase with t_init={config.t_init} and "
            f"t_final={config.t_final}: AdaLoRA needs t_init < total_steps - t_final; lower "
            "t_init / t_final or raise total_steps"
        )
    return total_steps


def budget_schedule(step: int, b0: int, bT: int, config: AdaLoraConfig, total: int) -> tuple[int, bool]:
    """``(b⁽ᵗ⁾, mask now?)`` for the budgeting phase, as PEFT computes it (floor, ``step %
    delta_t``). The final mask is decided by the caller."""
    t_init, t_final = config.t_init, config.t_final
    if step <= t_init:
        return b0, False
    if step > total - t_final:
        return bT, True
    mul = 1 - (step - t_init) / (total - t_final - t_init)
    return int((b0 - bT) * (mul**3) + bT), step % config.delta_t == 0


def final_step(config: AdaLoraConfig, total: int) -> int:
    """The step of the final mask: ``T − t_final``, or the last step ``T − 1`` when
    ``t_final = 0`` (so a loop over ``range(T)`` ends at the final budget)."""
    return total - config.t_final if config.t_final > 0 else total - 1


# --------------------------------------------------------------------------------------------
# State shared by the adapters of one injection
# --------------------------------------------------------------------------------------------


@dataclass
class MaskRecord:
    """One mask: the step, the budget and the rank each layer kept (in model order)."""

    step: int
    budget: int
    ranks: tuple[int, ...]
    final: bool = False


class AdaLoraState(nn.Module):
    """The allocator of one injection: schedule position, mask history, the missing-hook watch.

    It holds no tensors (nothing of it goes into files); importance statistics live on each
    adapter, in fp32.
    """

    def __init__(self, config: AdaLoraConfig):
        super().__init__()
        self.config = config
        self.frozen = False  # the final mask is applied and the tensors are shrunk
        self.history: list[MaskRecord] = []
        self.hook_count = 0  # per-step hook calls, read by the missing-hook watch
        self.reported = False
        self.warned_total = False
        self.total: int | None = None  # the checked training length

    @property
    def allocates(self) -> bool:
        """Whether this injection has a budget to reduce at all."""
        return self.config.final_r < self.config.r

    def resolve_total(self, given: int | None) -> int | None:
        cfg_total = self.config.total_steps
        if given is not None and cfg_total is not None and given != cfg_total:
            raise ConfigError(
                f"total_steps is {cfg_total} in the AdaLoRA config but {given} was passed to the "
                "step hooks; give it in one place"
            )
        total = given if given is not None else cfg_total
        if total is not None and total != self.total:
            self.total = check_schedule(self.config, total)
        return total

    def extra_repr(self) -> str:
        return f"frozen={self.frozen}, masks={len(self.history)}, total_steps={self.total}"


def _groups(adapters: Iterable[AdaLoRA]) -> list[tuple[AdaLoraState, list[AdaLoRA]]]:
    """Adapters grouped by injection (one budget each), in model order."""
    found: dict[int, tuple[AdaLoraState, list[AdaLoRA]]] = {}
    for a in adapters:
        found.setdefault(id(a.shared), (a.shared, []))[1].append(a)
    return list(found.values())


# --------------------------------------------------------------------------------------------
# Shrinking tensors together with an optimizer's state
# --------------------------------------------------------------------------------------------

# Parameters shrunk while no optimizer was known (lorazoo.after_step without optimizer=): the
# next optimizer that steps them gets its state for them shrunk too (a global pre-hook).
# id(parameter) -> (weak reference to it, old shape, dim, kept indices); keyed by id because
# tensors do not compare as dictionary keys
_PENDING: dict[int, tuple[weakref.ref, torch.Size, int, Tensor]] = {}
_GLOBAL_HOOK: list[Any] = []


def _shrink_state(
    optimizer: torch.optim.Optimizer, p: Tensor, old: torch.Size, dim: int, idx: Tensor
) -> None:
    state = optimizer.state.get(p)
    if not state:
        return
    new: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, Tensor) and v.dim() > 0:
            if v.shape != old:
                # a state this rule cannot slice (a factored second moment): start it afresh
                optimizer.state[p] = {}
                return
            v = v.index_select(dim, idx.to(v.device))
        new[k] = v
    optimizer.state[p] = new


def _fix_pending(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = _PENDING.get(id(p))
            if entry is not None and entry[0]() is p:
                del _PENDING[id(p)]
                _shrink_state(optimizer, p, *entry[1:])
    for key in [k for k, e in _PENDING.items() if e[0]() is None]:
        del _PENDING[key]
    if not _PENDING and _GLOBAL_HOOK:
        _GLOBAL_HOOK.pop().remove()


def _shrink(p: nn.Parameter, dim: int, idx: Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    old = p.shape
    new = p.data.index_select(dim, idx)
    # Autograd caches a leaf's gradient accumulator, with the leaf's shape, for as long as a
    # graph that used it is alive (a loop that keeps last step's ``loss``); replacing the data
    # drops that cache only when the dtype or device changes. Passing through another dtype
    # makes the next forward build a fresh accumulator with the new shape.
    p.data = new.to(torch.float64 if new.dtype != torch.float64 else torch.float32)
    p.data = new
    if p.grad is not None:
        p.grad = p.grad.index_select(dim, idx)
    if optimizer is not None:
        _shrink_state(optimizer, p, old, dim, idx)
    else:
        _PENDING[id(p)] = (weakref.ref(p), old, dim, idx)
        if not _GLOBAL_HOOK:
            _GLOBAL_HOOK.append(register_optimizer_step_pre_hook(_fix_pending))


# --------------------------------------------------------------------------------------------
# The variant
# --------------------------------------------------------------------------------------------


class AdaLoRA(lorazoo.Variant):
    """``lora_A`` (``r × d_in``), ``lora_E`` (``r × 1``), ``lora_B`` (``d_out × r``); see the module
    docstring."""

    name = "adalora"
    claims = (
        Claim(
            "at an equal final parameter budget, learns at least as much as LoRA (within 0.01 bpb)",
            paper="Zhang et al., arXiv 2303.10512",
            checks=(
                # the final budget: LoRA's factors plus one λ per kept triplet
                Compare("trainable", Ref("adalora"), "<", Ref("lora"), ratio=1.02),
                Compare("learned_bpb", Ref("adalora"), ">", Ref("lora"), slack=0.01),
            ),
        ),
    )
    config_class = AdaLoraConfig
    exact_at_init = True  # E = 0 exactly
    # Λ starts at zero and P, Q at N(0, 0.02²): the update starts far smaller than LoRA's and
    # needs a larger rate to get going in short runs.
    recommended_lr = 5e-3

    def __init__(self, layer: lorazoo.LayerInfo, config: AdaLoraConfig, shared: nn.Module | None = None):
        if not isinstance(shared, AdaLoraState):
            raise ConfigError("AdaLoRA adapters are built by lorazoo.inject, which supplies their allocator")
        super().__init__(layer, config, shared)
        opts = {"dtype": layer.adapter_dtype, "device": layer.device}
        self.lora_A = nn.Parameter(torch.empty(config.r, layer.d_in, **opts))
        self.lora_E = nn.Parameter(torch.zeros(config.r, 1, **opts))
        self.lora_B = nn.Parameter(torch.empty(layer.d_out, config.r, **opts))
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        # fp32 (Ī, Ū) per tensor (A, E, B), allocated at the first step; a plain attribute, so
        # module.to(dtype) never casts them
        self.stats: tuple[list[Tensor], list[Tensor]] | None = None
        self._seen_version: int | None = None
        self._seen_hooks = 0
        self._unhooked = 0

    # ---- math -----------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        """The number of triplets this layer holds now (``init_r`` until the final mask)."""
        return self.lora_A.shape[0]

    @property
    def scale(self) -> float:
        return self.config.alpha / (self.config.r + EPS)

    def lowrank(self, weight: Tensor | None = None) -> lorazoo.LowRank:
        return lorazoo.LowRank(self.lora_A * self.lora_E, self.lora_B, self.scale)

    def forward(self, x: Tensor, base_out: Tensor, host: lorazoo.AdaptedLinear) -> Tensor:
        if self.training:
            self._watch()
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A * self.lora_E)
        return F.linear(h, self.lora_B) * self.scale

    def output(self, x: Tensor, base_out: Tensor, host: lorazoo.AdaptedLinear) -> Tensor:
        """Alone on its layer: ``y += s·h·Bᵀ`` in one ``addmm_`` into the fresh base output."""
        A = self.lora_A
        if not (
            A.dtype == x.dtype == base_out.dtype
            and A.device == base_out.device
            and base_out.is_contiguous()
            and not torch.is_autocast_enabled(base_out.device.type)
            and not _compiling()  # a traced graph takes the out-of-place sum
        ):
            return base_out + self(x, base_out, host).to(base_out.dtype)
        if self.training:
            self._watch()
        if self.rank == 0:  # every triplet of this layer was pruned
            return base_out
        h = F.linear(self.dropout(x), A * self.lora_E)
        flat = base_out.view(-1, base_out.shape[-1])
        flat.addmm_(h.reshape(flat.shape[0], self.rank), self.lora_B.t(), alpha=self.scale)
        return base_out

    @classmethod
    def num_trainable(cls, d_in: int, d_out: int, config: AdaLoraConfig) -> int:
        return config.r * (d_in + d_out + 1)

    # ---- the missing-hook watch -------------------------------------------------------------

    def _watch(self) -> None:
        """Count optimizer updates of this adapter (its ``A``'s version moves) that no per-step
        hook followed; past :data:`UNHOOKED_LIMIT` raise, once per injection."""
        if not torch.is_grad_enabled() or _compiling():
            # a traced graph cannot read version counters; eager steps keep watching
            return
        state: AdaLoraState = self.shared
        v = self.lora_A._version
        if v == self._seen_version:
            return
        first = self._seen_version is None
        self._seen_version = v
        if state.hook_count != self._seen_hooks:
            self._seen_hooks = state.hook_count
            self._unhooked = 0
            return
        if first or state.frozen or not state.allocates:
            return
        self._unhooked += 1
        if self._unhooked > UNHOOKED_LIMIT and not state.reported:
            state.reported = True
            raise AdaLoraHooksError(
                f"this AdaLoRA model was trained for {self._unhooked} optimizer steps without its "
                "per-step work, so its ranks never change: call lorazoo.attach(model, optimizer, "
                "total_steps=...) once before training (or lorazoo.after_step(model, step, "
                "total_steps=...) after every optimizer.step())"
            )

    # ---- the per-step work --------------------------------------------------------------------

    @classmethod
    def on_step_begin(cls, adapters: Sequence[lorazoo.Variant], info: lorazoo.StepInfo) -> None:
        for state, group in _groups(adapters):  # type: ignore[arg-type]
            state.hook_count += 1
            total = state.resolve_total(info.total_steps)
            if (
                not state.allocates
                or state.frozen
                or (total is not None and info.step >= total - state.config.t_final)
            ):
                continue
            update_importance(group, state.config)

    @classmethod
    def on_step_end(cls, adapters: Sequence[lorazoo.Variant], info: lorazoo.StepInfo) -> None:
        for state, group in _groups(adapters):  # type: ignore[arg-type]
            if state.frozen or not state.allocates:
                continue
            total = state.resolve_total(info.total_steps)
            if total is None:
                if not state.warned_total:
                    state.warned_total = True
                    warnings.warn(
                        "AdaLoRA does not know the training length, so it keeps every rank: pass "
                        "total_steps to lorazoo.attach (or its handle), to lorazoo.after_step, or "
                        "to inject",
                        AdaLoraWarning,
                        stacklevel=4,
                    )
                continue
            cfg = state.config
            n = len(group)
            b0, bT = cfg.r * n, cfg.final_r * n
            if info.step >= final_step(cfg, total):
                keep = mask_to_budget(group, bT)
                state.history.append(MaskRecord(info.step, bT, _ranks(keep), final=True))
                shrink(group, keep, info.optimizer)
                state.frozen = True
                continue
            budget, due = budget_schedule(info.step, b0, bT, cfg, total)
            if due:
                keep = mask_to_budget(group, budget)
                state.history.append(MaskRecord(info.step, budget, _ranks(keep)))

    # ---- loss, files ------------------------------------------------------------------------

    @classmethod
    def extra_loss(cls, adapters: Sequence[lorazoo.Variant]) -> Tensor | None:
        total: Tensor | None = None
        for state, group in _groups(adapters):  # type: ignore[arg-type]
            cfg = state.config
            terms = [orthogonality(a, cfg.orth_reg_form) for a in group if a.lora_A.requires_grad]
            terms = [t for t in terms if t is not None]
            if cfg.orth_reg_weight == 0 or not terms:
                continue
            if cfg.orth_reg_form == "paper":
                term = cfg.orth_reg_weight * torch.stack(terms).sum()
            else:
                term = cfg.orth_reg_weight * torch.stack(terms).sum() / (2 * len(terms))
            total = term if total is None else total + term
        return total

    def extra_metadata(self) -> dict[str, Any]:
        return {"adalora_rank": self.rank}

    def from_file(self, info: Mapping[str, Any]) -> None:
        rank = info.get("adalora_rank", self.config.r)
        if isinstance(rank, bool) or not isinstance(rank, int) or not (0 <= rank <= self.config.r):
            raise AdapterFileError(
                f"the file gives this AdaLoRA layer rank {rank!r}; it must be an integer between 0 "
                f"and the initial rank r={self.config.r}"
            )
        if rank != self.rank:
            opts = {"dtype": self.lora_A.dtype, "device": self.lora_A.device}
            self.lora_A = nn.Parameter(torch.zeros(rank, self.d_in, **opts))
            self.lora_E = nn.Parameter(torch.zeros(rank, 1, **opts))
            self.lora_B = nn.Parameter(torch.zeros(self.d_out, rank, **opts))
        # a file holds kept ranks only after the final mask: a loaded model does not allocate
        if rank < self.config.r:
            self.shared.frozen = True

    @classmethod
    def shared_state(cls, config: AdaLoraConfig, layers: Sequence[lorazoo.LayerInfo]) -> nn.Module:
        return AdaLoraState(config)

    @classmethod
    def bench_kwargs(cls, rank: int) -> dict[str, Any]:
        """``--rank`` is the final average rank: ``r = ceil(1.5·rank)``, ``target_r = rank``."""
        return {"r": math.ceil(1.5 * rank), "target_r": rank}

    @classmethod
    def bench_record(cls, model: nn.Module, name: str) -> dict[str, Any]:
        """The rank kept per layer and every mask's budget and ranks, for the bench's report."""
        return {"ranks": ranks(model, name), "rank_history": rank_history(model, name)}


# --------------------------------------------------------------------------------------------
# The allocator's pieces (public for tests and tools)
# --------------------------------------------------------------------------------------------


def _tensors(a: AdaLoRA) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
    return a.lora_A, a.lora_E, a.lora_B


def update_importance(adapters: Sequence[AdaLoRA], config: AdaLoraConfig) -> None:
    """One step of the sensitivity and uncertainty EMAs for every adapter whose tensors all have
    a gradient, in fp32 (foreach kernels over all layers at once)."""
    live = [a for a in adapters if all(p.grad is not None for p in _tensors(a))]
    if not live:
        return
    for a in live:
        ps = _tensors(a)
        if a.stats is None or a.stats[0][0].device != ps[0].device:
            a.stats = (
                [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in ps],
                [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in ps],
            )
    params = [p for a in live for p in _tensors(a)]
    ibar = [t for a in live for t in a.stats[0]]  # type: ignore[index]
    ubar = [t for a in live for t in a.stats[1]]  # type: ignore[index]
    w = [p.detach().float() for p in params]
    g = [p.grad.float() for p in params]  # type: ignore[union-attr]
    sens = torch._foreach_mul(w, g)
    torch._foreach_abs_(sens)  # I = |w · ∂L/∂w|
    torch._foreach_lerp_(ibar, sens, 1.0 - config.beta1)  # Ī ← β₁Ī + (1 − β₁)I
    torch._foreach_sub_(sens, ibar)
    torch._foreach_abs_(sens)  # |I − Ī|
    torch._foreach_lerp_(ubar, sens, 1.0 - config.beta2)  # Ū ← β₂Ū + (1 − β₂)|I − Ī|


def triplet_scores(adapter: AdaLoRA) -> Tensor:
    """``S_i = s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)`` with ``s = Ī·Ū`` (fp32, length ``rank``);
    zeros for an adapter that never had a gradient."""
    if adapter.stats is None:
        return torch.zeros(adapter.rank, dtype=torch.float32, device=adapter.lora_A.device)
    (iA, iE, iB), (uA, uE, uB) = adapter.stats
    s_a = (iA * uA).mean(dim=1)
    s_b = (iB * uB).mean(dim=0)
    return (iE * uE).view(-1) + (s_a + s_b)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _comm_device(t: Tensor) -> Tensor:
    # gloo reduces CPU tensors; NCCL needs them on the GPU
    if torch.distributed.get_backend() == "gloo":
        return t.cpu()
    return t


def select(scores: Tensor, budget: int) -> Tensor:
    """A boolean mask keeping exactly ``budget`` of ``scores``: the highest, ties to the lower
    position (a stable sort), NaN scores last. Under ``torch.distributed`` the scores are
    averaged over ranks first and rank 0's mask is broadcast, so every rank keeps the same."""
    if _distributed():
        dist = torch.distributed
        s = _comm_device(scores.clone())
        dist.all_reduce(s, op=dist.ReduceOp.SUM)
        scores = (s / dist.get_world_size()).to(scores.device)
    budget = max(0, min(budget, scores.numel()))
    clean = torch.nan_to_num(scores, nan=-math.inf)
    order = torch.sort(clean, descending=True, stable=True).indices
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[order[:budget]] = True
    if _distributed():
        k = _comm_device(keep.to(torch.uint8))
        torch.distributed.broadcast(k, src=0)
        keep = k.to(device=scores.device, dtype=torch.bool)
    return keep


@torch.no_grad()
def mask_to_budget(adapters: Sequence[AdaLoRA], budget: int) -> list[Tensor]:
    """Keep the ``budget`` best triplets over ``adapters`` and write exact zeros into the other
    ``E`` entries. Returns each adapter's keep mask."""
    scores = [triplet_scores(a) for a in adapters]
    device = adapters[0].lora_A.device
    keep = select(torch.cat([s.to(device) for s in scores]), budget)
    masks = list(torch.split(keep, [s.numel() for s in scores]))
    for a, m in zip(adapters, masks, strict=True):
        a.lora_E.masked_fill_(~m.to(a.lora_E.device).view(-1, 1), 0.0)
    return masks


def _ranks(masks: Sequence[Tensor]) -> tuple[int, ...]:
    return tuple(int(m.sum()) for m in masks)


@torch.no_grad()
def shrink(
    adapters: Sequence[AdaLoRA], masks: Sequence[Tensor], optimizer: torch.optim.Optimizer | None
) -> None:
    """Cut every adapter's tensors (and ``optimizer``'s state for them) to its kept triplets.

    The parameter objects stay the same (their data is replaced), so optimizer groups and any
    reference to them remain valid. Without an optimizer, the next optimizer that steps them has
    its state cut by a one-off global pre-hook. The importance statistics are dropped."""
    for a, m in zip(adapters, masks, strict=True):
        idx = m.to(a.lora_A.device).nonzero().view(-1)
        if idx.numel() == a.rank:
            a.stats = None
            continue
        _shrink(a.lora_A, 0, idx, optimizer)
        _shrink(a.lora_E, 0, idx, optimizer)
        _shrink(a.lora_B, 1, idx, optimizer)
        a.stats = None


def orthogonality(adapter: AdaLoRA, form: str = "paper") -> Tensor | None:
    """``‖BᵀB − I‖²_F + ‖AAᵀ − I‖²_F`` (``"paper"``), or the sum of the unsquared norms
    (``"peft"``); None for a layer with no triplet left."""
    if adapter.rank == 0:
        return None
    total = None
    for m in (adapter.lora_A, adapter.lora_B.t()):
        m = m if m.dtype in (torch.float32, torch.float64) else m.float()
        gram = m @ m.t()
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        d = torch.linalg.matrix_norm(gram - eye)
        d = d.square() if form == "paper" else d
        total = d if total is None else total + d
    return total


# --------------------------------------------------------------------------------------------
# Looking at a model
# --------------------------------------------------------------------------------------------


def _adapters(model: nn.Module, name: str) -> list[tuple[str, AdaLoRA]]:
    found = [(path, a) for path, n, a in iter_adapters(model) if n == name and isinstance(a, AdaLoRA)]
    if not found:
        raise LorazooError(f"the model has no AdaLoRA adapter named {name!r}")
    return found


def ranks(model: nn.Module, name: str = "default") -> dict[str, int]:
    """``{layer path: rank}``: the non-zero ``λ`` of each layer of adapter ``name``."""
    return {path: int((a.lora_E != 0).sum()) for path, a in _adapters(model, name)}


def rank_history(model: nn.Module, name: str = "default") -> list[dict[str, Any]]:
    """Every mask so far: ``{"step", "budget", "final", "ranks": {layer path: kept}}``."""
    found = _adapters(model, name)
    paths = [p for p, _ in found]
    state: AdaLoraState = found[0][1].shared
    return [
        {
            "step": m.step,
            "budget": m.budget,
            "final": m.final,
            "ranks": dict(zip(paths, m.ranks, strict=True)),
        }
        for m in state.history
    ]


@lorazoo.hookimpl
def lorazoo_variants() -> list[type[lorazoo.Variant]]:
    return [AdaLoRA]
