"""Quantise the linear layers of a model to NF4, or turn NF4 layers back into dense ones.

Both calls are all-or-nothing: every replacement layer is built first, without touching the
model; then all of them are swapped in, and any failure (a ``KeyboardInterrupt`` included) puts
every original module back before the error propagates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import MergeError, TargetError
from .linear import NF4Linear
from .nf4 import QuantError, quant_error


@dataclass
class QuantReport:
    """What :func:`quantize` did: the layers replaced, and the rounding error of each."""

    layers: dict[str, QuantError] = field(default_factory=dict)

    @property
    def worst(self) -> tuple[str, QuantError] | None:
        """The layer with the largest relative error."""
        if not self.layers:
            return None
        return max(self.layers.items(), key=lambda kv: kv[1].relative)

    def storage_bytes(self) -> int:
        return sum(round(e.bits_per_param * e.numel / 8) for e in self.layers.values())

    def __str__(self) -> str:
        worst = self.worst
        if worst is None:
            return "no layer quantised"
        n, (path, err) = len(self.layers), worst
        return f"{n} layers quantised to NF4; largest relative error {err.relative:.4g} in {path}"


def _swap(model: nn.Module, replacements: list[tuple[str, nn.Module]]) -> None:
    """Set every ``path -> module`` at once; on any failure restore the originals."""
    done: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for path, new in replacements:
            parent_path, _, leaf = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            old = getattr(parent, leaf)
            setattr(parent, leaf, new)
            done.append((parent, leaf, old))
    except BaseException:
        for parent, leaf, old in reversed(done):
            setattr(parent, leaf, old)
        raise


def _plain_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _resolve_linear(model: nn.Module, targets) -> list[tuple[str, nn.Linear]]:
    from ..engine.targets import resolve

    chosen = resolve(model, targets)
    wrong = [(n, m) for n, m in chosen if not _plain_linear(m)]
    if wrong:
        listed = ", ".join(f"{n} ({type(m).__name__})" for n, m in wrong[:8])
        raise TargetError(
            f"quantize replaces plain nn.Linear layers only; the targets also matched {listed}. "
            "Quantise before adding adapters, and name linear layers (e.g. 'q_proj') or use 'all-linear'."
        )
    return chosen  # type: ignore[return-value]


@torch.no_grad()
def quantize(
    model: nn.Module,
    targets="all-linear",
    *,
    double_quant: bool = True,
    on_layer: Callable[[str, QuantError], None] | None = None,
) -> QuantReport:
    """Replace the ``nn.Linear`` layers ``targets`` selects by :class:`NF4Linear` (in place).

    ``targets`` follows the rules of :func:`lorazoo.inject` (``"all-linear"`` skips the output
    head). The report gives each layer's rounding error, measured against the dense weight
    before it is dropped (``on_layer`` is called with each as it is measured). Nothing changes
    when any layer fails to quantise.
    """
    chosen = _resolve_linear(model, targets)
    built: list[tuple[str, nn.Module]] = []
    report = QuantReport()
    for path, lin in chosen:
        layer = NF4Linear.from_linear(lin, double_quant=double_quant)
        err = quant_error(lin.weight, layer.nf4())
        built.append((path, layer))
        report.layers[path] = err
        if on_layer is not None:
            on_layer(path, err)
    _swap(model, built)
    return report


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every :class:`NF4Linear` in ``model`` by a dense ``nn.Linear`` holding its
    dequantised weight (in ``dtype``, default each layer's ``weight_dtype``). Returns the paths
    replaced. Each new layer keeps the old layer's bias parameter object when the dtype is
    unchanged (a copy when it is cast). Memory grows to the dense size; nothing changes when any
    layer fails. A layer holding a dense (merged) weight is refused: its dequantised packed
    weight is not what it computes with. So is a model whose NF4 layers carry adapters (eject
    them first; eject leaves the NF4Linear layers)."""
    from ..engine.host import AdaptedLayer

    adapted = [n for n, m in model.named_modules() if isinstance(m, AdaptedLayer) and m.kind.storage == "nf4"]
    if adapted:
        raise MergeError(
            f"{len(adapted)} NF4 layers carry adapters, e.g. {adapted[0]!r}; their adapters were "
            "trained on the NF4 base, and dequantize replaces only plain NF4Linear layers: call "
            "lorazoo.eject(model) first (it leaves the NF4Linear layers), then dequantize. To keep "
            "a merged model instead, use lorazoo.merge(model)"
        )
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear) and n]
    if isinstance(model, NF4Linear):
        raise TargetError("the model itself is an NF4Linear; call its to_linear() instead")
    dense = [n for n, m in found if m.holds_dense]
    if dense:
        raise MergeError(
            f"{len(dense)} NF4 layers hold a dense (merged) weight, e.g. {dense[0]!r}; unmerge first "
            "(their packed storage is not what they compute with), then dequantize"
        )
    built = []
    for n, m in found:
        keep = m.bias is None or (dtype or m.weight_dtype) == m.bias.dtype
        built.append((n, m.to_linear(dtype, keep_bias=keep)))
    _swap(model, built)
    return [n for n, _ in built]


def storage_for(
    cls: type, config: object, matches: list[tuple[str, nn.Module]]
) -> list[tuple[str, nn.Module]]:
    """The targets of an injection, each in the base storage the variant class asks for.

    A variant class with ``base_storage = "nf4"`` (QLoRA) trains on an NF4 base: each plain
    ``nn.Linear`` target is replaced (in the returned list only; the model is not touched) by a
    new :class:`NF4Linear` quantised from it with the config's ``double_quant``, which the
    injection then wraps, so quantising and attaching the adapters are one atomic step. Targets
    already stored in NF4 are kept as they are; a dense layer that already carries adapters is
    refused (its adapters were trained on the dense weight). Any other variant: ``matches``
    unchanged."""
    from ..engine.host import AdaptedLayer
    from ..engine.kinds import kind_of
    from ..errors import ConfigError

    storage = getattr(cls, "base_storage", "dense")
    if storage == "dense":
        return matches
    if storage != "nf4":
        raise ConfigError(f"variant {cls.__name__} asks for base storage {storage!r}; lorazoo stores 'nf4'")
    double_quant = bool(getattr(config, "double_quant", True))
    out: list[tuple[str, nn.Module]] = []
    for path, module in matches:
        kind = kind_of(module)
        if kind is not None and getattr(kind, "storage", "dense") == "nf4":
            out.append((path, module))
        elif isinstance(module, AdaptedLayer):
            raise ConfigError(
                f"variant {cls.name!r} trains on an NF4 base, but layer {path!r} is a dense layer that "
                f"already carries adapters {list(module.adapters)} (trained on the dense weight): eject "
                "them first, or quantise the model (lorazoo.quantize) before adding any adapter"
            )
        elif _plain_linear(module) and module.weight.device.type == "meta":
            # a stand-in on the meta device (a load's dry run): the layer it will be, unfilled
            d = {"device": "meta", "weight_dtype": module.weight.dtype}
            bias = module.bias is not None
            out.append((path, NF4Linear(module.in_features, module.out_features, bias, double_quant, **d)))
        elif _plain_linear(module):
            out.append((path, NF4Linear.from_linear(module, double_quant=double_quant)))
        else:
            out.append((path, module))  # the variant's layer checks say why it is not adapted
    return out
