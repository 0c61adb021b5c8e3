"""Layer kinds: what lorazoo knows about each type of layer it can wrap.

A kind is one small object, a :class:`LayerKind`, registered through the plugin hook
``lorazoo_layer_kinds`` (the built-in ones come from this package's own entry point, like the
built-in variants). It recognises the modules it wraps, gives their shape as a linear map
``d_out × d_in`` and names the host class that takes the module's place in the model. The host
class (a subclass of :class:`~lorazoo.engine.host.AdaptedLayer`) holds everything that depends on
how the layer stores its weight and computes its output: the dense ``d_out × d_in`` view of the
weight variants read, the layout merges write in, and the forward that adds the adapters.

Built-in kinds: ``nn.Linear`` (:mod:`.linear`), ``nn.Embedding`` (:mod:`.embedding`) and
transformers' ``Conv1D`` (:mod:`.conv1d_hf`, recognised only when transformers is imported),
``nn.Conv1d`` and ``nn.Conv2d`` (:mod:`.conv`), and lorazoo's ``NF4Linear`` (:mod:`.nf4`, a 4-bit NF4 base).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..host import AdaptedLayer


class LayerKind:
    """One type of layer lorazoo can adapt. Subclass it, set the class attributes, and return an
    instance from a ``lorazoo_layer_kinds`` hook implementation.

    Class attributes:
        name: the kind's unique name (``"linear"``, ``"embedding"``, ``"conv1d_hf"``).
        adapts_as: the name variants list in their ``layer_kinds`` to adapt this kind: a layer
            that is a linear map, whatever its storage, says ``"linear"``; an embedding says
            ``"embedding"``. Adapter files and variants see this name as the layer's kind.
        linear: True when ``targets="all-linear"`` (and the target class ``nn.Linear``)
            includes these layers.
        host_class: the :class:`~lorazoo.engine.host.AdaptedLayer` subclass that wraps them.
        label: how messages name the layers of this kind (``"torch.nn.Linear"``).
        storage: how the layer stores its weight (``"dense"``; ``"nf4"`` for 4-bit NF4 codes),
            what :class:`~lorazoo.LayerInfo` tells variants as ``storage``.
    """

    name: ClassVar[str] = ""
    adapts_as: ClassVar[str] = "linear"
    linear: ClassVar[bool] = False
    host_class: ClassVar[type[AdaptedLayer]]
    label: ClassVar[str] = ""
    storage: ClassVar[str] = "dense"

    # ---- recognising a module ----------------------------------------------------------------

    def recognise(self, module: nn.Module) -> bool:
        """True for a plain (not yet wrapped) module of this kind, supported or not."""
        raise NotImplementedError

    def refusal(self, module: nn.Module) -> str | None:
        """Why a module :meth:`recognise` accepts cannot be adapted (an embedding with
        ``max_norm``), or None when it can. Default: None."""
        return None

    def dims(self, module: nn.Module) -> tuple[int, int]:
        """``(d_out, d_in)`` of the module (plain or wrapped) seen as a linear map."""
        raise NotImplementedError

    def stored_weight(self, module: nn.Module) -> Tensor:
        """The tensor the plain module stores its weight in (the one merges change). Default:
        ``module.weight``."""
        return module.weight

    def weight_view(self, stored: Tensor) -> Tensor:
        """The ``d_out × d_in`` view of a stored weight that variants read. Default: itself."""
        return stored

    def wrap(self, module: nn.Module) -> AdaptedLayer:
        """A new host for ``module``."""
        return self.host_class(module, self)

    # ---- what the conformance suite builds -----------------------------------------------------

    def example(self, d_in: int, d_out: int, bias: bool, dtype: torch.dtype) -> nn.Module:
        """A small module of this kind with the linear shape ``d_out × d_in`` (initialised from
        torch's global generator) for :mod:`lorazoo.testing`."""
        raise NotImplementedError

    def example_input(self, module: nn.Module, batch: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """An input batch for :meth:`example`'s module (on CPU, cast as the suite needs).
        Default: normal values in ``[-4, 4]``, ``batch + (d_in,)``."""
        d_in = self.dims(module)[1]
        return torch.randn(*batch, d_in, generator=generator).clamp(-4, 4)

    def dense_input(self, module: nn.Module, x: Tensor) -> Tensor:
        """``x`` as the ``d_in``-vectors the linear map ``d_out × d_in`` sees (one-hot rows for
        an embedding); the conformance suite bounds rounding errors with it. Default: ``x``."""
        return x

    def dense_output(self, module: nn.Module, y: Tensor) -> Tensor:
        """The module's output ``y`` as rows of ``d_out`` features matching :meth:`dense_input`'s
        rows (a convolution's ``N × out × …`` output as ``N × L × out``). Default: ``y``."""
        return y

    def __repr__(self) -> str:
        return f"<layer kind {self.name!r}>"


def kinds() -> list[LayerKind]:
    """Every registered layer kind, in lookup order."""
    from ... import registry

    return registry.layer_kinds()


def kind_of(module: nn.Module) -> LayerKind | None:
    """The kind of a plain module or of a host, or None when no registered kind recognises it."""
    from ..host import AdaptedLayer

    if isinstance(module, AdaptedLayer):
        return module.kind
    for kind in kinds():
        if kind.recognise(module):
            return kind
    return None


def stored_weight(module: nn.Module) -> Tensor:
    """The tensor a plain module or a host stores its weight in."""
    from ..host import AdaptedLayer

    if isinstance(module, AdaptedLayer):
        return module.stored_weight
    kind = kind_of(module)
    return kind.stored_weight(module) if kind is not None else module.weight


def builtin_kinds() -> list[LayerKind]:
    from .conv import Conv1dKind, Conv2dKind
    from .conv1d_hf import HFConv1DKind
    from .embedding import EmbeddingKind
    from .linear import LinearKind
    from .nf4 import NF4Kind

    return [LinearKind(), EmbeddingKind(), HFConv1DKind(), Conv1dKind(), Conv2dKind(), NF4Kind()]


__all__ = ["LayerKind", "builtin_kinds", "kind_of", "kinds", "stored_weight"]
