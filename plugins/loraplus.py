"""LoRA+ (Hayou, Ghosh and Yu, arXiv 2402.12354): LoRA whose ``B`` factor learns ``λ`` times faster.

The tensors, initialisation, scale ``α/r``, forward, merge and file layout are LoRA's; only the
optimizer groups differ. The paper's width-scaling analysis (with Adam) finds that efficient
feature learning needs ``η_B/η_A`` to grow with the width, so one learning rate for both factors
is suboptimal; a fixed ratio ``λ = 16`` is its rule of thumb.

:meth:`LoRAPlus.param_groups` splits this variant's trainable tensors as docs/spec/variants.md §4's table
(PEFT's ``create_loraplus_optimizer``, the authors' ``loraplus.py``):

* ``loraplus.A`` at ``lr``, decay ``wd``: every tensor not in another group (the ``A`` factors);
* ``loraplus.B`` at ``λ·lr``, decay ``wd``: the ``B`` factors and 1-D tensors other than biases
  (a DoRA-style magnitude, should a subclass add one);
* ``loraplus.B_bias`` at ``λ·lr``, decay 0: 1-D bias tensors (PEFT's ``groupB_no_decay``);
* ``loraplus.embed`` at ``lr_embedding``, decay ``wd``: every tensor of an adapter on an
  embedding layer.

Adapters with different ``λ`` or ``lr_embedding`` in one model (two named LoRA+ adapters) get a
group each, named with the value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

import lorazoo
from lorazoo.claims import Claim, Compare, Ref


def _positive(name: str, value: object, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise lorazoo.ConfigError(f"{name} must be a positive number, got {value!r}; {hint}")
    if not (math.isfinite(value) and value > 0):
        raise lorazoo.ConfigError(f"{name} must be a finite number > 0, got {value}; {hint}")


@dataclass(frozen=True)
class LoraPlusConfig(lorazoo.VariantConfig):
    """LoRA's ``r``, ``alpha``, ``dropout``, plus ``lr_ratio`` (``λ``, default 16: ``B`` trains at
    ``λ·lr``) and ``lr_embedding`` (the absolute learning rate of adapters on embedding layers,
    default 1e-6, not scaled by ``lr``)."""

    lr_ratio: float = 16.0
    lr_embedding: float = 1e-6

    def validate(self) -> None:
        super().validate()
        _positive("lr_ratio", self.lr_ratio, "B trains at lr_ratio·lr, and the paper's rule of thumb is 16")
        _positive(
            "lr_embedding", self.lr_embedding, "it is the absolute rate of embedding adapters, default 1e-6"
        )


class LoRAPlus(lorazoo.LowRankAdapter):
    name = "loraplus"
    claims = (
        Claim(
            "reaches LoRA's final training loss in at most 0.6× LoRA's steps (same lr for A)",
            paper="Hayou, Ghosh and Yu, arXiv 2402.12354",
            checks=(Compare("steps_to_loss", Ref("loraplus"), "<", Ref("lora"), ratio=0.6),),
        ),
    )
    config_class = LoraPlusConfig
    layer_kinds = frozenset({"linear", "embedding", "conv"})
    # The A group's rate. With λ = 16 the B factors train at 1.6e-2 under AdamW, which is what
    # makes LoRA+ reach a loss in fewer steps than LoRA at the same base rate
    # (tests/test_training.py).
    recommended_lr = 1e-3

    def __init__(self, layer: lorazoo.LayerInfo, config: LoraPlusConfig, shared: nn.Module | None = None):
        super().__init__(layer, config, shared)
        self.on_embedding = layer.kind == "embedding"

    @classmethod
    def param_groups(
        cls, adapters: Sequence[lorazoo.Variant], lr: float, weight_decay: float
    ) -> list[dict[str, Any]]:
        # (role, learning rate, weight decay) -> tensors; roles in table order, a group per
        # distinct setting so several LoRA+ adapters with their own λ share one call.
        found: dict[tuple[str, float, float], list[nn.Parameter]] = {}
        for adapter in adapters:
            cfg = adapter.config
            b_factor = getattr(adapter, "lora_B", None)
            for pname, p in adapter.named_parameters():
                if not p.requires_grad:
                    continue
                if getattr(adapter, "on_embedding", False):
                    key = ("embed", cfg.lr_embedding, weight_decay)
                elif p is b_factor:
                    key = ("B", cfg.lr_ratio * lr, weight_decay)
                elif p.dim() == 1 and pname.rsplit(".", 1)[-1].endswith("bias"):
                    key = ("B_bias", cfg.lr_ratio * lr, 0.0)
                elif p.dim() == 1:
                    key = ("B", cfg.lr_ratio * lr, weight_decay)
                else:
                    key = ("A", lr, weight_decay)
                found.setdefault(key, []).append(p)
        roles = ("A", "B", "B_bias", "embed")
        per_role = {role: sum(1 for k in found if k[0] == role) for role in roles}
        groups = []
        for key in sorted(found, key=lambda k: (roles.index(k[0]), k[1], k[2])):
            role, group_lr, wd = key
            name = f"{cls.name}.{role}"
            if per_role[role] > 1:
                name += f"[lr={group_lr:g}]"
            groups.append({"params": found[key], "lr": group_lr, "weight_decay": wd, "name": name})
        return groups

    def extra_metadata(self) -> dict[str, Any]:
        return {"loraplus_lr_ratio": self.config.lr_ratio}


@lorazoo.hookimpl
def lorazoo_variants() -> list[type[lorazoo.Variant]]:
    return [LoRAPlus]
