"""LoRA (Hu et al., arXiv 2106.09685): ``W x + s·B·A·drop(x)`` with ``s = α / r``.

``A`` is Kaiming-uniform (``U(±1/√d_in)``), ``B`` is zero, so the adapted model starts equal to
the base bit for bit. Trainable parameters per layer: ``r·(d_in + d_out)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import lorazoo
from lorazoo.claims import Claim, Compare, Ref


@dataclass(frozen=True)
class LoraConfig(lorazoo.VariantConfig):
    """``r`` (default 8), ``alpha`` (default 8, so ``s = 1``), ``dropout`` on the adapter input."""


class LoRA(lorazoo.LowRankAdapter):
    name = "lora"
    claims = (
        Claim(
            "learns less and forgets less than full fine-tuning",
            paper="Hu et al., arXiv 2106.09685",
            checks=(
                Compare("learned_bpb", Ref("lora"), "<", Ref("full")),
                Compare("forgot_bpb", Ref("lora"), "<", Ref("full")),
            ),
        ),
    )
    config_class = LoraConfig
    layer_kinds = frozenset({"linear", "embedding", "conv"})


@lorazoo.hookimpl
def lorazoo_variants() -> list[type[lorazoo.Variant]]:
    return [LoRA]
