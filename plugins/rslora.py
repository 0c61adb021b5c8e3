"""rsLoRA (Kalajdzievski, arXiv 2312.03732): LoRA with the rank-stabilised scale ``s = α / √r``.

With ``α / r`` the adapter's effect shrinks as the rank grows ("gradient collapse"), so larger
ranks learn no better; ``α / √r`` keeps the output and gradient magnitudes independent of ``r``.
Same tensors, initialisation and file layout as LoRA; rsLoRA with ``(r, α)`` equals LoRA with
``(r, α·√r)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lorazoo
from lorazoo.claims import Claim, Compare, Ref


@dataclass(frozen=True)
class RsLoraConfig(lorazoo.VariantConfig):
    """``r`` (default 8), ``alpha`` (default 8, so ``s = 8/√8 ≈ 2.83``), ``dropout``."""


class RsLoRA(lorazoo.LowRankAdapter):
    name = "rslora"
    claims = (
        Claim(
            "at rank 64 learns more than LoRA; from the bench rank to 64 its gain holds up, LoRA's shrinks",
            paper="Kalajdzievski, arXiv 2312.03732",
            checks=(
                Compare("learned_bpb", Ref("rslora", 64), ">", Ref("lora", 64)),
                Compare("learned_bpb", Ref("rslora", 64), ">", Ref("rslora"), slack=0.01),
                Compare("learned_bpb", Ref("lora", 64), "<", Ref("lora")),
            ),
        ),
    )
    config_class = RsLoraConfig
    layer_kinds = frozenset({"linear", "embedding", "conv"})

    @property
    def scale(self) -> float:
        return self.config.alpha / math.sqrt(self.config.r)


@lorazoo.hookimpl
def lorazoo_variants() -> list[type[lorazoo.Variant]]:
    return [RsLoRA]
