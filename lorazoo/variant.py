"""The abstract adapter interface every variant implements, and the config base class.

A variant is mostly math. The engine (``lorazoo.engine``) owns everything else: finding layers,
wrapping them, freezing, merge bookkeeping, files. The contract between the two is small:

* ``__init__(layer, config, shared)``: create the adapter tensors for one base layer.
* ``lowrank(weight)``: the adapter's update in low-rank form (:class:`LowRank`). Every variant
  in the LoRA family can state its merged weight as ``W' = c ⊙_row (W + s·B·A)``. Additive
  variants have ``c = 1``; DoRA has ``c = m / ‖W + s·B·A‖_row``. From this one form the engine
  merges in fp32, unmerges bit-exactly, computes tolerances and routes mixed batches.
* ``forward(x, base_out, host)``: the adapter's contribution on the unmerged path. The host
  returns ``base_out + Σ contributions``.
* ``num_trainable(d_in, d_out, config)``: the variant's trainable-parameter formula; the
  conformance suite checks it against the real count.

Optional class-level hooks shape training (``param_groups``, ``extra_loss``, the per-step
``on_step_begin`` / ``on_step_end`` / ``after_step``), share state across layers
(``shared_state``) and prepare the base weight (``prepare_base``).
``docs/interface.md`` maps each of the eight built-in variants onto these hooks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, closest

if TYPE_CHECKING:
    from .claims import Claim


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantConfig:
    """Hyper-parameters shared by the LoRA family. Variants subclass it to add their own.

    Instances are immutable: the engine derives new ones with :meth:`replace` and never
    changes an object a caller handed in.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check ranges. Subclasses extend this and call ``super().validate()``."""
        r = self.r
        if isinstance(r, bool) or not isinstance(r, int):
            raise ConfigError(f"r must be an integer >= 1, got {r!r}")
        if r < 1:
            raise ConfigError(f"r must be >= 1, got {r}")
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ConfigError(f"alpha must be a positive number, got {alpha!r}")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ConfigError(f"alpha must be a finite number > 0, got {alpha}")
        p = self.dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p < 1.0):
            raise ConfigError(f"dropout must be a number with 0 <= dropout < 1, got {p!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> VariantConfig:
        """Build a config, rejecting unknown keywords with the list of valid ones."""
        cls._check_names(kwargs)
        return cls(**kwargs)

    def replace(self, **changes: Any) -> VariantConfig:
        """A copy with ``changes`` applied and validated; ``self`` is left as it was."""
        self._check_names(changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def _check_names(cls, kwargs: Mapping[str, Any]) -> None:
        valid = cls.field_names()
        unknown = [k for k in kwargs if k not in valid]
        if unknown:
            hints = []
            for k in unknown:
                near = closest(k, valid)
                hints.append(f"{k!r}" + (f" (did you mean {near!r}?)" if near else ""))
            raise ConfigError(
                f"unknown hyper-parameter {', '.join(hints)} for {cls.__name__}; "
                f"valid names are: {', '.join(valid)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# What a variant sees of the layer it adapts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerInfo:
    """The base layer an adapter is built for, in ``nn.Linear`` layout (``d_out × d_in``).

    ``weight`` is the live base weight (read it for data-aware initialisations such as OLoRA's
    QR; change it only through ``host.patch_base`` in :meth:`Variant.prepare_base`). ``kind``
    is the layer kind's ``adapts_as``, ``"linear"`` or ``"embedding"`` for the built-in kinds; an
    embedding is seen as the linear map from one-hot rows (``d_in = num_embeddings``,
    ``d_out = embedding_dim``), and ``weight`` is then a transposed view of its table (so is it
    for transformers' ``Conv1D``, which stores ``d_in × d_out``). ``storage`` says how the
    base stores its weight: ``"dense"``, or ``"nf4"`` for a 4-bit NF4 base, whose ``weight`` is
    then the dequantised ``d_out × d_in`` matrix (a copy: the packed codes are the storage).
    """

    path: str
    d_in: int
    d_out: int
    weight: Tensor
    has_bias: bool
    adapter_dtype: torch.dtype
    kind: str = "linear"
    storage: str = "dense"

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device


@dataclass(frozen=True)
class StepInfo:
    """What a variant's per-step hooks learn about the optimizer step they run around.

    ``step`` is the step number: the one the loop passes to :func:`lorazoo.after_step`, or the
    count of optimizer steps taken since :func:`lorazoo.attach` (0 for the first). ``total_steps``
    is the training length when the loop has said it (``None`` otherwise). ``optimizer`` is the
    optimizer whose step this is, when known (a variant that resizes its tensors must resize that
    optimizer's state with them).
    """

    step: int
    total_steps: int | None = None
    optimizer: torch.optim.Optimizer | None = None


@dataclass(frozen=True)
class LowRank:
    """An adapter's update in the form every LoRA-family variant shares.

    The merged weight is ``W' = c ⊙_row (W + s·B·A)``, i.e. ``ΔW(W) = (c − 1) ⊙_row W +
    c ⊙_row (s·B·A)``; ``c = None`` means 1 (an additive variant).
    """

    A: Tensor  # r × d_in
    B: Tensor  # d_out × r
    scale: float
    row_scale: Tensor | None = None  # c, length d_out


class PlainLowRank(NamedTuple):
    """The factors of an adapter whose contribution is exactly ``s·B·A·drop(x)`` (what
    :meth:`Variant.plain_lowrank` reports): the engine then computes it on its fast paths."""

    A: Tensor  # r × d_in
    B: Tensor  # d_out × r
    scale: float
    dropout: nn.Module


class Host(Protocol):
    """What a variant sees of the layer that carries it (the engine's
    :class:`~lorazoo.engine.host.AdaptedLayer` and its per-kind subclasses).

    ``weight`` is the base weight in the ``d_out × d_in`` layout the variant's factors use (for a
    layer that stores it otherwise, a view of the stored tensor), ``bias`` the base bias or None.
    """

    weight: Tensor
    bias: Tensor | None
    in_features: int
    out_features: int
    adapters: nn.ModuleDict
    active: tuple[str, ...]
    merged: Any

    def patch_base(self, owner: str, B: Tensor, A: Tensor, row_scale: Tensor | None = None) -> None: ...

    def check_unpatch(self, owner: str) -> None: ...


# --------------------------------------------------------------------------------------------
# The variant interface
# --------------------------------------------------------------------------------------------


class Variant(nn.Module, ABC):
    """An adapter attached to one base layer. Subclass it and register the class by plugin.

    Class attributes:
        name: the unique name users select the variant by.
        config_class: the :class:`VariantConfig` subclass holding its hyper-parameters.
        exact_at_init: True when the adapted output equals the base output bit for bit right
            after injection (the conformance suite checks it; otherwise within tolerance).
        example_config: hyper-parameters the conformance suite adds to ``r`` and ``alpha``
            (for variants with required settings).
        recommended_lr: the AdamW learning rate this variant is known to train well with on
            small and mid-sized models (``lorazoo bench`` uses it unless told otherwise; scale it
            down for models of billions of parameters).
        layer_kinds: the layer kinds it adapts, by the name a layer kind adapts as:
            ``"linear"`` (every kind that is a linear map: ``nn.Linear``, transformers'
            ``Conv1D``, ...) and (for additive variants whose output is exactly their
            ``lowrank()`` product) ``"embedding"``. On an embedding the
            engine computes ``s·Aᵀ[ids]·Bᵀ`` from ``lowrank()`` itself; ``forward`` and dropout
            are not used there.
        claims: the qualitative claims of the variant's paper, as :class:`lorazoo.claims.Claim`
            data; ``lorazoo bench --claims`` runs what they need and says whether each holds.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[VariantConfig]] = VariantConfig
    exact_at_init: ClassVar[bool] = True
    example_config: ClassVar[dict[str, Any]] = {}
    recommended_lr: ClassVar[float] = 1e-3
    layer_kinds: ClassVar[frozenset[str]] = frozenset({"linear"})
    claims: ClassVar[tuple[Claim, ...]] = ()

    def __init__(self, layer: LayerInfo, config: VariantConfig, shared: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.d_in = layer.d_in
        self.d_out = layer.d_out
        self.dropout: nn.Module = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if shared is not None:
            self.shared = shared

    # ---- the math every variant supplies -----------------------------------------------------

    @abstractmethod
    def lowrank(self, weight: Tensor | None = None) -> LowRank:
        """The update in low-rank form.

        ``weight`` is the pre-merge base weight (storage dtype, read-only); only non-additive
        variants (DoRA) read it, to compute their row factor ``c``. The engine calls
        ``lowrank(weight)`` at merge and keeps ``c``; at unmerge it calls ``lowrank(None)`` and
        reuses the kept ``c`` (so ``row_scale`` may be None then).
        """

    @abstractmethod
    def forward(self, x: Tensor, base_out: Tensor, host: Host) -> Tensor:
        """The contribution ``c_a(x)`` this adapter adds to the base output (unmerged path)."""

    def output(self, x: Tensor, base_out: Tensor, host: Host) -> Tensor:
        """The layer's whole unmerged output, ``base_out + c_a(x)``.

        The engine calls this instead of :meth:`forward` when this adapter is the only one the
        layer runs (active and unmerged). ``base_out`` is then the layer's own fresh output,
        referenced by nothing else: an override may write into it in place and keep the result
        for backward (an autograd ``Function`` marks it dirty), which lets a variant share
        storage with whatever the next operation saves. The default adds :meth:`forward`'s
        contribution; overriding is only worth it for a variant whose contribution depends on
        ``base_out`` (DoRA).
        """
        return base_out + self(x, base_out, host).to(base_out.dtype)

    @classmethod
    @abstractmethod
    def num_trainable(cls, d_in: int, d_out: int, config: VariantConfig) -> int:
        """The trainable-parameter count of one adapted ``d_out × d_in`` layer."""

    def plain_lowrank(self) -> PlainLowRank | None:
        """The factors ``(A, B, scale, dropout)`` when this adapter's contribution is exactly
        ``s·B·A·drop(x)``, else None (the default). An adapter that reports them lets the engine
        compute its contribution itself (one fused ``addmm_`` into the base output, one shared
        product over a routed batch) instead of calling :meth:`forward`."""
        return None

    # ---- derived math ----------------------------------------------------------------------

    def delta_weight(self, weight: Tensor) -> Tensor:
        """``ΔW`` for the base ``weight`` (in the weight's layout), formed in fp32 (fp64 for an
        fp64 weight): the merged weight is ``weight + delta_weight(weight)``."""
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        w = weight.to(acc)
        lr = self.lowrank(w)
        update = lr.scale * (lr.B.to(acc) @ lr.A.to(acc))
        if lr.row_scale is None:
            return update
        c = lr.row_scale.to(acc).unsqueeze(1)
        return (c - 1) * w + c * update

    @classmethod
    def bench_kwargs(cls, rank: int) -> dict[str, Any]:
        """The ``inject`` keyword arguments ``lorazoo bench`` uses at its comparable ``rank``.

        Default ``{"r": rank}`` for a config whose default ``r`` is the family's 8; a config with
        another default rank (VeRA's 256) runs at that default scaled by ``rank / 8``. ``alpha``
        stays at the config's default, so a scale ``alpha / r`` shrinks as the rank grows (what
        the rank sweep shows). Override it for a variant whose budget is set differently.
        """
        default_r = next((f.default for f in dataclasses.fields(cls.config_class) if f.name == "r"), 8)
        return {"r": max(1, round(int(default_r) * rank / 8))}

    @classmethod
    def bench_record(cls, model: nn.Module, name: str) -> dict[str, Any]:
        """Extra figures ``lorazoo bench`` stores with a run of this variant (adapter ``name`` of
        ``model``) after training, as JSON values. Default: nothing. AdaLoRA records the rank it
        kept per layer (``"ranks"``) and the history of its masks (``"rank_history"``)."""
        return {}

    # ---- optional hooks ----------------------------------------------------------------------

    @classmethod
    def check_layer(cls, layer: LayerInfo, config: VariantConfig) -> None:
        """Reject a layer this config cannot adapt. Default: ``r <= min(d_in, d_out)``."""
        if config.r > min(layer.d_in, layer.d_out):
            raise ConfigError(
                f"r={config.r} is larger than min(d_in, d_out)={min(layer.d_in, layer.d_out)} "
                f"of layer {layer.path!r} ({layer.d_out}×{layer.d_in}); use r <= "
                f"{min(layer.d_in, layer.d_out)} or leave this layer out of the targets"
            )

    @classmethod
    def shared_state(cls, config: VariantConfig, layers: Sequence[LayerInfo]) -> nn.Module | None:
        """State shared by all adapters of one injection (VeRA's frozen projections).

        Called once per ``inject`` with every target layer; the module returned is handed to
        each adapter's constructor as ``shared``. Keep its tensors as non-persistent buffers when
        they are regenerated rather than saved.
        """
        return None

    def prepare_base(self, host: Host, name: str) -> None:
        """Prepare the base layer after the adapter ``name`` is built and attached (OLoRA
        rewrites ``W``; QLoRA would quantise it).

        Change the weight only through ``host.patch_base(name, B, A)``, which the engine reverts
        bit-exactly on eject. Use factors fixed at construction, not the live parameters:
        ``lorazoo.load`` copies the file's tensors into the adapter between construction and
        this call.
        """

    @classmethod
    def param_groups(
        cls, adapters: Sequence[Variant], lr: float, weight_decay: float
    ) -> list[dict[str, Any]]:
        """Optimizer groups for the trainable tensors of ``adapters`` (all of this class).

        The groups must partition those tensors; the engine checks it. Default: one group.
        """
        params = [p for a in adapters for p in a.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}] if params else []

    @classmethod
    def extra_loss(cls, adapters: Sequence[Variant]) -> Tensor | None:
        """A term to add to the training loss (AdaLoRA's orthogonality penalty), or None."""
        return None

    @classmethod
    def after_step(cls, adapters: Sequence[Variant], step: int) -> None:
        """Per-step training work, run after ``optimizer.step()``. The default
        :meth:`on_step_end` calls it; a variant that needs the optimizer or the training length
        overrides :meth:`on_step_end` instead."""

    @classmethod
    def on_step_begin(cls, adapters: Sequence[Variant], info: StepInfo) -> None:
        """Per-step work that reads the final gradients and the weights *before* the update
        (AdaLoRA's importance statistics). :func:`lorazoo.attach` runs it in the optimizer's
        step pre-hook; :func:`lorazoo.after_step`, which is only called after the update, runs
        it right before :meth:`on_step_end`. Called under ``torch.no_grad()``. Default: nothing.
        """

    @classmethod
    def on_step_end(cls, adapters: Sequence[Variant], info: StepInfo) -> None:
        """Per-step work after the update (AdaLoRA's rank budget and masking), run by the
        optimizer's step post-hook (:func:`lorazoo.attach`) or by :func:`lorazoo.after_step`.
        Called under ``torch.no_grad()``. Default: :meth:`after_step` with ``info.step``."""
        cls.after_step(adapters, info.step)

    def extra_metadata(self) -> dict[str, Any]:
        """JSON-serialisable facts written to the adapter file beside the config (in the entry
        of this adapter's module)."""
        return {}

    def from_file(self, info: Mapping[str, Any]) -> None:
        """Called by :func:`lorazoo.load` on a freshly built adapter, before the file's tensors
        are checked and copied into it, with its module's entry in the file (what
        :meth:`extra_metadata` wrote, beside ``d_in``, ``d_out``, ``kind``). A variant whose
        tensor shapes differ per module (AdaLoRA's kept ranks) reshapes its tensors here; raise
        :class:`~lorazoo.AdapterFileError` for an entry that does not fit. Default: nothing."""

    def tensors(self) -> Iterable[tuple[str, Tensor]]:
        """Every tensor an adapter file holds for this adapter (persistent state)."""
        return self.state_dict(keep_vars=True).items()

    def extra_repr(self) -> str:
        return f"{self.name}: d_in={self.d_in}, d_out={self.d_out}, {self.config}"


class LowRankAdapter(Variant):
    """``A`` (``r × d_in``) and ``B`` (``d_out × r``) with ``ΔW = s·B·A``: LoRA's building block.

    Subclasses change the scale (rsLoRA), the initialisation (OLoRA), optimizer groups (LoRA+)
    or add terms (DoRA) without repeating the tensors, the forward or the file layout.
    Tensor names follow PEFT (``lora_A``, ``lora_B``).
    """

    def __init__(self, layer: LayerInfo, config: VariantConfig, shared: nn.Module | None = None):
        super().__init__(layer, config, shared)
        opts = {"dtype": layer.adapter_dtype, "device": layer.device}
        self.lora_A = nn.Parameter(torch.empty(config.r, layer.d_in, **opts))
        self.lora_B = nn.Parameter(torch.empty(layer.d_out, config.r, **opts))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # U(-1/sqrt(d_in), 1/sqrt(d_in)) for A, zeros for B: ΔW = 0 at initialisation.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def scale(self) -> float:
        return self.config.alpha / self.config.r

    def lowrank(self, weight: Tensor | None = None) -> LowRank:
        return LowRank(self.lora_A, self.lora_B, self.scale)

    def lowrank_out(self, x: Tensor) -> Tensor:
        """``s·B·A·drop(x)`` in the adapter dtype."""
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        return F.linear(h, self.lora_B) * self.scale

    def forward(self, x: Tensor, base_out: Tensor, host: Host) -> Tensor:
        return self.lowrank_out(x)

    def plain_lowrank(self) -> PlainLowRank | None:
        if not fusable(type(self)):
            return None
        return PlainLowRank(self.lora_A, self.lora_B, self.scale, self.dropout)

    @classmethod
    def num_trainable(cls, d_in: int, d_out: int, config: VariantConfig) -> int:
        return config.r * (d_in + d_out)


@functools.cache
def fusable(cls: type) -> bool:
    """True when adapters of ``cls`` report plain low-rank factors (:meth:`Variant.plain_lowrank`)
    and so may take the engine's fused forward path.

    The fused path computes ``y += s·(drop(x)·Aᵀ)·Bᵀ`` in one ``addmm_`` on the base output. For
    :class:`LowRankAdapter` and its subclasses it is only valid while the contribution is exactly
    that class's, so a subclass qualifies only by keeping its ``forward`` and ``lowrank_out``
    untouched; overriding either (DoRA) selects the general path, and a subclass can also opt
    out with ``fused_forward = False``. Another variant qualifies by overriding
    :meth:`Variant.plain_lowrank`. The answer is cached per class (it is asked on every forward).
    """
    if not (isinstance(cls, type) and issubclass(cls, Variant)):
        return False
    if getattr(cls, "fused_forward", True) is False:
        return False
    if issubclass(cls, LowRankAdapter):
        return (
            cls.forward is LowRankAdapter.forward
            and cls.lowrank_out is LowRankAdapter.lowrank_out
            and cls.plain_lowrank is LowRankAdapter.plain_lowrank
        ) or cls.plain_lowrank not in (LowRankAdapter.plain_lowrank, Variant.plain_lowrank)
    return cls.plain_lowrank is not Variant.plain_lowrank
