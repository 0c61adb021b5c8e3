"""OLoRA (Büyükakyüz, arXiv 2406.01775): LoRA initialised from an orthonormal basis of ``W``.

``Q, R = qr(W)`` (reduced, in fp32); ``B₀ = Q[:, :r]`` (orthonormal columns), ``A₀ = R[:r, :]``
(upper trapezoidal). ``B₀A₀ = Q_r Q_rᵀ W`` is the projection of ``W`` onto the span of its first
``r`` columns, so training starts from a direction the base already uses. To keep the output
unchanged at initialisation the base is rewritten to ``W_res = W − s·B₀A₀`` (docs/spec/variants.md §7,
PEFT's ``init_lora_weights="olora"``); the adapter's forward, merge and unmerge are LoRA's,
relative to ``W_res``.

Exactness, weaker than LoRA's where it must be:

* **Init identity holds within τ, not bitwise** (``exact_at_init = False``): ``cast(W − s·B₀A₀)``
  plus ``s·B₀A₀`` rounds, so the adapted output right after injection equals the base output
  only up to the §11 tolerance.
* ``unmerge`` restores ``W_res`` bit for bit (the adapter is relative to it); ``eject`` — after
  a merge or not — restores the **original** ``W`` bit for bit: the rewrite goes through
  ``host.patch_base``, which keeps ``A₀``, ``−s·B₀`` and a one-byte-per-element bit-pattern
  residual instead of a copy of ``W``.
* **After a cast** (``model.to(torch.bfloat16)``, ``.half()``, ``.double()``), "the original"
  means the cast of the original: the host takes the rewrite out in the old dtype (exactly),
  casts ``W``, and rewrites it again in the new dtype, so ``eject`` gives ``cast(W)`` bit for
  bit and ``W_res`` is re-derived from it (within rounding of the cast of the old ``W_res``).

Files hold ``lora_A``, ``lora_B`` relative to ``W_res``, as PEFT's do. ``lorazoo.load`` builds
the adapter on the original base (re-running the QR), copies the file's ``A``, ``B`` in, and only
then calls :meth:`OLoRA.prepare_base`, which rewrites the base with the factors fixed at
construction — not the loaded ones. :func:`to_lora` converts an OLoRA adapter into a plain LoRA
of rank ``2r`` relative to the original ``W`` (§7 "Loading and export"), for tools that know
nothing of the rewrite.

Trainable parameters per layer: ``r·(d_in + d_out)``, as LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import lorazoo
from lorazoo import ConfigError, LorazooError
from lorazoo.claims import Claim, Compare, Ref
from lorazoo.plugin import accumulation_dtype as acc_dtype
from lorazoo.plugin import adapted_layers, adapters_named


@dataclass(frozen=True)
class OLoraConfig(lorazoo.VariantConfig):
    """``r`` (default 8, at most ``min(d_in, d_out)``), ``alpha`` (default 8), ``dropout``, and
    ``rslora``: scale ``α/√r`` instead of ``α/r`` (PEFT's ``use_rslora``)."""

    rslora: bool = False

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.rslora, bool):
            raise ConfigError(f"rslora must be True or False, got {self.rslora!r}")


def qr_factors(weight: Tensor, r: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(B₀, A₀) = (Q[:, :r], R[:r, :])`` of the reduced QR of ``weight`` in fp32, cast to the
    adapter ``dtype``. Deterministic on one device and library, so re-running it on the same
    ``W`` reproduces the factors (and hence ``W_res``) bit for bit."""
    q, rr = torch.linalg.qr(weight.detach().float(), mode="reduced")
    return q[:, :r].to(dtype).contiguous(), rr[:r, :].to(dtype).contiguous()


class OLoRA(lorazoo.LowRankAdapter):
    """LoRA whose ``A``, ``B`` start at ``R[:r, :]``, ``Q[:, :r]`` of ``W``'s QR, over a base
    rewritten to ``W − s·B₀A₀``. See the module docstring for what is exact and what is within τ.
    """

    name = "olora"
    claims = (
        Claim(
            "lower training loss than LoRA in the first quarter of the steps",
            paper="Büyükakyüz, arXiv 2406.01775",
            checks=(Compare("early_loss", Ref("olora"), "<", Ref("lora")),),
        ),
    )
    config_class = OLoraConfig
    # On a convolution the QR is of the flattened ``out × (in·k…)`` weight, and the rewrite and
    # the factors are in that view, as for a linear layer.
    layer_kinds = frozenset({"linear", "conv"})
    exact_at_init = False
    # OLoRA changes only the initialisation, so it keeps LoRA's default (Variant.recommended_lr).
    # A 60-step AdamW sweep on a
    # 2-layer LlamaLike, all-linear, r=16, α=32, gave eval losses 4.49 / 3.42 / 2.92 / 4.01
    # nats at 3e-4 / 1e-3 / 3e-3 / 1e-2 (LoRA at 1e-3: 3.40).
    recommended_lr = 1e-3

    def __init__(self, layer: lorazoo.LayerInfo, config: OLoraConfig, shared: nn.Module | None = None):
        # The QR must see the base as it is *now*: lorazoo.load builds adapters on the original
        # base and copies the file's tensors in before prepare_base runs.
        self._init_factors = qr_factors(layer.weight, config.r, layer.adapter_dtype)
        super().__init__(layer, config, shared)

    @torch.no_grad()  # as a decorator: grad mode comes back in torch's frame, even on an interrupt
    def reset_parameters(self) -> None:
        B0, A0 = self._init_factors
        self.lora_A.copy_(A0)
        self.lora_B.copy_(B0)

    @property
    def scale(self) -> float:
        a, r = self.config.alpha, self.config.r
        return a / math.sqrt(r) if self.config.rslora else a / r

    @property
    def initial_factors(self) -> tuple[Tensor, Tensor]:
        """``(B₀, A₀)`` as fixed at construction (not the live, possibly trained or loaded,
        ``lora_B``, ``lora_A``)."""
        return self._init_factors

    @classmethod
    def check_layer(cls, layer: lorazoo.LayerInfo, config: OLoraConfig) -> None:
        limit = min(layer.d_in, layer.d_out)
        if config.r > limit:
            raise ConfigError(
                f"OLoRA takes its factors from the reduced QR of {layer.path!r} "
                f"({layer.d_out}×{layer.d_in}), which has only {limit} columns in Q, so r={config.r} "
                f"is too large: use r <= {limit} or leave this layer out of the targets"
            )

    def prepare_base(self, host: lorazoo.AdaptedLinear, name: str) -> None:
        """``W ← cast(W − s·B₀A₀)`` through the engine's reversible patch, so eject gives the
        original ``W`` back bit for bit."""
        B0, A0 = self._init_factors
        acc = acc_dtype(host.weight.dtype)
        host.patch_base(name, B0.to(acc) * (-self.scale), A0.to(acc))

    def _apply(self, fn, recurse=True):  # keep B₀, A₀ on the adapter's device/dtype
        out = super()._apply(fn, recurse)
        self._init_factors = tuple(fn(t) for t in self._init_factors)
        return out

    def extra_metadata(self) -> dict[str, object]:
        # Tells a reader the tensors are relative to the rewritten base, as PEFT's "olora" init.
        return {"relative_to": "W - s*Q[:, :r] @ R[:r, :] (QR of the original weight, fp32)"}


@torch.no_grad()
def to_lora(model: nn.Module, name: str = "default") -> nn.Module:
    """Replace OLoRA adapter ``name`` by an equivalent plain LoRA relative to the *original* base.

    The rank doubles: ``A' = [A; A₀]``, ``B' = [B, −B₀]`` and ``α' = 2α`` (``√2·α`` with
    ``rslora``, as an ``rslora`` adapter), so the scale ``s`` is unchanged and
    ``W + s·B'A' = W_res + s·BA`` in real arithmetic (docs/spec/variants.md §7, invariant 6: the forward
    agrees within τ). The base comes back bit for bit (the rewrite is ejected), the new adapter
    keeps the name, dtype and active state, and ``lorazoo.save`` then writes a file that any
    LoRA loader can apply to the original weights. Returns ``model``.
    """
    entries = adapters_named(model, name)
    adapter = entries[0][2]
    if not isinstance(adapter, OLoRA):
        raise LorazooError(
            f"adapter {name!r} is a {type(adapter).name!r} adapter; to_lora converts OLoRA adapters only"
        )
    cfg = adapter.config
    for path, host, _ in entries:
        if host.merged is not None and name in host.merged.names:
            raise LorazooError(f"adapter {name!r} is merged into {path!r}; unmerge before converting it")
        host.check_unpatch(name)  # refuses before anything changes if a later rewrite sits on top
    factors = {}
    for path, host, a in entries:
        B0, A0 = a.initial_factors
        factors[path] = (
            torch.cat([a.lora_A.detach(), A0.to(a.lora_A)], dim=0),
            torch.cat([a.lora_B.detach(), -B0.to(a.lora_B)], dim=1),
            name in host.active,
        )
    dtype = adapter.lora_A.dtype
    variant = lorazoo.variant("rslora" if cfg.rslora else "lora")
    alpha = cfg.alpha * (math.sqrt(2.0) if cfg.rslora else 2.0)
    new_cfg = variant.config_class.from_kwargs(r=2 * cfg.r, alpha=alpha, dropout=cfg.dropout)
    # Everything the injection below could refuse is checked first, while nothing has changed.
    for path, host, _ in entries:
        info = lorazoo.LayerInfo(
            path, host.in_features, host.out_features, host.weight.detach(), host.bias is not None, dtype
        )
        try:
            variant.check_layer(info, new_cfg)
        except LorazooError as exc:
            raise LorazooError(
                f"cannot export OLoRA adapter {name!r} as a rank-{2 * cfg.r} {variant.name}: {exc}"
            ) from exc
    lorazoo.eject(model, name)
    wanted = set(factors)
    lorazoo.inject(model, variant, targets=lambda n, m: n in wanted, name=name, config=new_cfg, dtype=dtype)
    for path, host in adapted_layers(model):
        if path in factors and name in host.adapters:
            A, B, active = factors[path]
            new = host.adapters[name]
            new.lora_A.copy_(A)
            new.lora_B.copy_(B)
            if not active:
                host.set_active([n for n in host.active if n != name])
    return model


@lorazoo.hookimpl
def lorazoo_variants() -> list[type[lorazoo.Variant]]:
    return [OLoRA]
