"""QLoRA (Dettmers et al., arXiv 2305.14314): LoRA on a frozen base stored in 4-bit NF4.

The adapter is LoRA's: ``W x + s·B·A·drop(x)``, ``s = α / r``, ``A`` Kaiming-uniform, ``B`` zero,
``r·(d_in + d_out)`` trainable parameters per layer, the same tensors and file layout. What differs
is the base: each target's weight is held as NF4 codes with block-64 absmax scales, the scales
double-quantised by default (``lorazoo.quant``), and the adapter trains on top of ``dequant(Q)``.

The base recipe is part of the config (``quant_type``, ``block_size``, ``double_quant``) and the
class says ``base_storage = "nf4"``: ``lorazoo.inject`` quantises each plain ``nn.Linear``
target with that recipe and attaches the adapter in the same atomic step (layers already in NF4
are adapted as they are). :meth:`QLoRA.check_layer` refuses any layer that does not reach it
stored in NF4, so QLoRA never silently runs as LoRA on a dense base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorazoo_plugins.lora import LoRA

import lorazoo
from lorazoo.claims import Claim, Compare, Ref
from lorazoo.plugin import NF4_BLOCK, LayerInfo, VariantConfig

BLOCK = NF4_BLOCK

QUANT_TYPES = ("nf4",)
LEARNED_MARGIN = 0.02
"""How far (bits per byte of the target text) QLoRA's learned gain may fall below LoRA's on the
full-precision base for the claim to hold; see docs/variants/qlora.md."""


@dataclass(frozen=True)
class QLoraConfig(lorazoo.VariantConfig):
    """LoRA's ``r``, ``alpha`` (so ``s = α / r``) and ``dropout``, plus the base recipe:
    ``quant_type`` (``"nf4"``), ``block_size`` (64) and ``double_quant`` (True: the block scales
    are themselves quantised to 8 bits in groups of 256)."""

    quant_type: str = "nf4"
    block_size: int = BLOCK
    double_quant: bool = True

    def validate(self) -> None:
        super().validate()
        if self.quant_type not in QUANT_TYPES:
            raise lorazoo.ConfigError(
                f"quant_type must be one of {', '.join(map(repr, QUANT_TYPES))}, got {self.quant_type!r}"
            )
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs != BLOCK:
            raise lorazoo.ConfigError(f"block_size must be {BLOCK} (the NF4 storage's block), got {bs!r}")
        if not isinstance(self.double_quant, bool):
            raise lorazoo.ConfigError(f"double_quant must be True or False, got {self.double_quant!r}")


class QLoRA(LoRA):
    """LoRA on an NF4 base.

    ``base_storage`` (class attribute, ``"nf4"``) tells the engine how the base of every target
    must be stored before the adapter is attached: quantised with the config's ``quant_type``,
    ``block_size`` and ``double_quant`` (the same recipe an adapter file records, so a load onto a
    full-precision base quantises it identically). A variant without the attribute runs on
    whatever base it is given. ``check_layer`` refuses a layer whose :class:`LayerInfo` does not
    say ``storage == "nf4"``, before any change, instead of training plain LoRA on a dense base.
    """

    name = "qlora"
    config_class = QLoraConfig
    base_storage: ClassVar[str] = "nf4"
    layer_kinds = frozenset({"linear"})
    claims = (
        Claim(
            f"learns as much as LoRA on the full-precision base, within {LEARNED_MARGIN} bits per byte",
            paper="Dettmers et al., arXiv 2305.14314",
            checks=(Compare("learned_bpb", Ref("qlora"), ">", Ref("lora"), slack=LEARNED_MARGIN),),
        ),
    )

    @classmethod
    def check_layer(cls, layer: LayerInfo, config: VariantConfig) -> None:
        storage = getattr(layer, "storage", "dense")
        if storage != cls.base_storage:
            raise lorazoo.ConfigError(
                f"variant {cls.name!r} trains LoRA on a base stored in {cls.base_storage.upper()}, but "
                f"layer {layer.path!r} reaches it stored as {storage!r}: lorazoo.inject quantises "
                "plain nn.Linear targets itself (and adapts NF4 layers as they are); other layers "
                "cannot be quantised. Nothing was changed. Leave that layer out of the targets, or "
                "use variant 'lora' for LoRA on the dense base"
            )
        super().check_layer(layer, config)


@lorazoo.hookimpl
def lorazoo_variants() -> list[type[lorazoo.Variant]]:
    return [QLoRA]
