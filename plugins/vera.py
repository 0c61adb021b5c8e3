"""VeRA (Kopiczko, Blankevoort, Asano, arXiv 2310.11454): frozen shared random projections, two
trained vectors per layer.

One pair of frozen random matrices serves every layer of an injection: ``A_sh`` (``r × in_max``)
and ``B_sh`` (``out_max × r``), sized for the largest ``d_in`` and ``d_out`` over the targets.
Each layer uses the top-left slices ``A_sl = A_sh[:, :d_in]``, ``B_sl = B_sh[:d_out, :]`` (views
of the same storage: two layers of one shape read identical slices) and trains only
``vera_lambda_b`` (``d_out``, zeros) and ``vera_lambda_d`` (``r``, constant ``d_initial``):

    y = W x + b + λ_b ⊙ (B_sl (λ_d ⊙ (A_sl drop(x))))        ΔW = diag(λ_b)·B_sl·diag(λ_d)·A_sl

``λ_b = 0`` makes the output equal to the base bit for bit at initialisation; it also makes the
first step's gradient for ``λ_d`` zero, so ``λ_b`` moves first (expected, docs/spec/variants.md §8).

**Projections** are generated exactly as PEFT does (docs/spec/variants.md §8), on the CPU whatever the
model's device, so they are reproducible from the seed: ``g = torch.Generator("cpu")
.manual_seed(projection_prng_key)``; ``A_sh`` first, then ``B_sh``, each a float32
``uniform_(−β, β, generator=g)`` with ``β = √(6 / fan_in)`` (``fan_in`` = second dimension:
``in_max`` for ``A_sh``, ``r`` for ``B_sh``); then moved to the layers' device and adapter dtype.

**Files.** ``save_projection=False`` (lorazoo's default; PEFT's default is ``True``) keeps the
projections as non-persistent buffers: the file stores the seed and recipe in its config and
metadata, not the matrices, and loading regenerates them bit for bit (on the CPU generator, so
on any device). That makes a VeRA file tiny (``Σ (d_out + r)`` numbers). With
``save_projection=True`` the pair is stored once under ``__shared__.vera_A`` /
``__shared__.vera_B`` and loading uses the stored matrices — choose it if the file must survive
a change of the PyTorch generator.

**No α.** VeRA has no scale: ``λ_b`` and ``λ_d`` carry it, so the low-rank form is
``(λ_d ⊙ A_sl, λ_b ⊙ B_sl, s = 1)``. ``alpha`` is still accepted (validated as a positive
number, kept in the file) because callers pass ``(r, alpha)`` to every variant alike; it has no
effect on VeRA.

``r`` defaults to 256 (PEFT's default) and may exceed ``min(d_in, d_out)``: each extra rank adds
one trained number per layer, not a row and a column. Trainable parameters per layer:
``d_out + r``; the frozen ``r·in_max + out_max·r`` exist once per injection and are never
trainable, in no optimizer group and not counted by ``lorazoo.trainable``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lorazoo
from lorazoo import ConfigError
from lorazoo.claims import Claim, Compare, Ref

# The generation rule, written into every file so a reader knows how to rebuild the pair.
RECIPE = (
    "torch.Generator('cpu').manual_seed(key); A[r,in_max] then B[out_max,r]; fp32 uniform(±sqrt(6/fan_in))"
)


@dataclass(frozen=True)
class VeraConfig(lorazoo.VariantConfig):
    """VeRA's hyper-parameters.

    ``r`` (default 256): rank of the shared projections; may exceed a layer's dimensions.
    ``alpha``: accepted for a uniform interface and ignored — VeRA has no scale (``s = 1``).
    ``dropout``: on the adapter input. ``d_initial`` (default 0.1): the constant ``λ_d`` starts
    at; it must be non-zero (with ``λ_b = 0`` as well, no gradient would ever reach either
    vector). ``projection_prng_key`` (default 0): seed of the CPU generator.
    ``save_projection`` (default False, unlike PEFT's True): store the pair in the file.
    """

    r: int = 256
    alpha: float = 1.0
    d_initial: float = 0.1
    projection_prng_key: int = 0
    save_projection: bool = False

    def validate(self) -> None:
        super().validate()
        d = self.d_initial
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d == 0:
            raise ConfigError(
                f"d_initial must be a finite non-zero number (PEFT's default is 0.1), got {d!r}: "
                "with λ_b starting at 0, d_initial = 0 leaves both vectors without gradient"
            )
        k = self.projection_prng_key
        if isinstance(k, bool) or not isinstance(k, int) or not (0 <= k < 2**63):
            raise ConfigError(f"projection_prng_key must be an integer in [0, 2**63), got {k!r}")
        if not isinstance(self.save_projection, bool):
            raise ConfigError(f"save_projection must be True or False, got {self.save_projection!r}")


def generate_projections(r: int, in_max: int, out_max: int, key: int) -> tuple[Tensor, Tensor]:
    """``(A_sh, B_sh)`` as float32 CPU tensors, by the docs/spec/variants.md §8 rule (bit-exact)."""
    g = torch.Generator("cpu").manual_seed(key)
    beta_a = math.sqrt(6.0 / in_max)
    beta_b = math.sqrt(6.0 / r)
    a = torch.empty(r, in_max, dtype=torch.float32).uniform_(-beta_a, beta_a, generator=g)
    b = torch.empty(out_max, r, dtype=torch.float32).uniform_(-beta_b, beta_b, generator=g)
    return a, b


class VeraProjections(nn.Module):
    """The frozen pair shared by every adapter of one injection (buffers, never parameters)."""

    def __init__(self, a: Tensor, b: Tensor, persistent: bool, key: int):
        super().__init__()
        self.register_buffer("vera_A", a, persistent=persistent)
        self.register_buffer("vera_B", b, persistent=persistent)
        self.key = key

    def extra_repr(self) -> str:
        return f"A={tuple(self.vera_A.shape)}, B={tuple(self.vera_B.shape)}, key={self.key}"


class VeRA(lorazoo.Variant):
    """Per layer ``vera_lambda_b`` (``d_out``) and ``vera_lambda_d`` (``r``) over slices of the
    injection's frozen projections. See the module docstring."""

    name = "vera"
    claims = (
        Claim(
            "at least 10× fewer trainable parameters than LoRA, learning at least 0.8× LoRA's gain",
            paper="Kopiczko, Blankevoort and Asano, arXiv 2310.11454",
            checks=(
                Compare("trainable", Ref("vera"), "<", Ref("lora"), ratio=0.1),
                Compare("learned_bpb", Ref("vera"), ">", Ref("lora"), ratio=0.8),
            ),
        ),
    )
    config_class = VeraConfig
    exact_at_init = True  # λ_b = 0 exactly
    # About ten times LoRA's 1e-3: the vectors scale fixed random directions and need larger
    # steps. The VeRA paper's tables use learning rates of this order (from memory of them, not
    # confirmed against the text); a 60-step AdamW sweep on a 2-layer LlamaLike, all-linear,
    # r=256, gave eval losses 5.55 / 5.42 / 4.86 / 4.38 nats at 1e-3 / 3e-3 / 1e-2 / 3e-2.
    recommended_lr = 1e-2

    def __init__(self, layer: lorazoo.LayerInfo, config: VeraConfig, shared: nn.Module | None = None):
        if not isinstance(shared, VeraProjections):
            raise ConfigError(
                "VeRA adapters are built by lorazoo.inject, which supplies the shared projections"
            )
        super().__init__(layer, config, shared)
        opts = {"dtype": layer.adapter_dtype, "device": layer.device}
        self.vera_lambda_b = nn.Parameter(torch.zeros(layer.d_out, **opts))
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial), **opts))

    # ---- shared state ---------------------------------------------------------------------

    @classmethod
    def shared_state(cls, config: VeraConfig, layers: Sequence[lorazoo.LayerInfo]) -> nn.Module:
        devices = {str(layer.device) for layer in layers}
        dtypes = {layer.adapter_dtype for layer in layers}
        if len(devices) > 1 or len(dtypes) > 1:
            raise ConfigError(
                "VeRA shares one pair of projections across its target layers, so they must sit on "
                f"one device with one adapter dtype; got devices {sorted(devices)} and dtypes "
                f"{sorted(map(str, dtypes))}: inject separately per device/dtype (with another name)"
            )
        in_max = max(layer.d_in for layer in layers)
        out_max = max(layer.d_out for layer in layers)
        a, b = generate_projections(config.r, in_max, out_max, config.projection_prng_key)
        opts = {"dtype": layers[0].adapter_dtype, "device": layers[0].device}
        return VeraProjections(a.to(**opts), b.to(**opts), config.save_projection, config.projection_prng_key)

    @classmethod
    def check_layer(cls, layer: lorazoo.LayerInfo, config: VeraConfig) -> None:
        """Any ``r >= 1`` fits any layer: the projections are sized by ``r`` and the largest
        target, not by this layer's rank."""

    # ---- math -----------------------------------------------------------------------------

    @property
    def projections(self) -> tuple[Tensor, Tensor]:
        """``(A_sl, B_sl)``: top-left views of the shared pair (same storage for every layer)."""
        return self.shared.vera_A[:, : self.d_in], self.shared.vera_B[: self.d_out, :]

    def lowrank(self, weight: Tensor | None = None) -> lorazoo.LowRank:
        a, b = self.projections
        return lorazoo.LowRank(self.vera_lambda_d.unsqueeze(1) * a, self.vera_lambda_b.unsqueeze(1) * b, 1.0)

    def forward(self, x: Tensor, base_out: Tensor, host: lorazoo.AdaptedLinear) -> Tensor:
        a, b = self.projections
        x = self.dropout(x.to(self.vera_lambda_d.dtype))
        rows, r = x.numel() // max(1, x.shape[-1]), a.shape[0]
        if rows * r * (self.d_in + self.d_out) > self.d_in * self.d_out * (r + rows):
            # With r = 256 two rank-r products per row cost more than forming ΔW (d_out × d_in)
            # once and applying it: fewer multiply-adds, and no (rows × r) activation kept.
            delta = (self.vera_lambda_b.unsqueeze(1) * b) @ (self.vera_lambda_d.unsqueeze(1) * a)
            return F.linear(x, delta)
        h = F.linear(x, a) * self.vera_lambda_d
        return F.linear(h, b) * self.vera_lambda_b

    @classmethod
    def num_trainable(cls, d_in: int, d_out: int, config: VeraConfig) -> int:
        return d_out + config.r

    def extra_metadata(self) -> dict[str, object]:
        a, b = self.shared.vera_A, self.shared.vera_B
        return {
            "projection": {
                "recipe": RECIPE,
                "key": self.config.projection_prng_key,
                "shape_A": list(a.shape),
                "shape_B": list(b.shape),
                "stored": self.config.save_projection,
            }
        }


@lorazoo.hookimpl
def lorazoo_variants() -> list[type[lorazoo.Variant]]:
    return [VeRA]
