"""The ``nn.Embedding`` kind.

Seen as a linear map from one-hot rows (``d_in = num_embeddings``, ``d_out = embedding_dim``),
an adapter's update is ``s·B·A`` with ``A`` ``r × num_embeddings`` and ``B``
``embedding_dim × r`` (PEFT's ``lora_embedding_A`` / ``lora_embedding_B``), and the stored weight
is that map's transpose.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import MergeError
from ...variant import Variant
from ..host import AdaptedLayer, Route, _add_rows
from . import LayerKind


class AdaptedEmbedding(AdaptedLayer):
    """An ``nn.Embedding`` with named adapters beside it.

    The forward looks up ``Aᵀ`` like the base weight, ``y = W[ids] + s·Aᵀ[ids]·Bᵀ`` (no dropout
    on the ids), and merges add ``(s·B·A)ᵀ``, through the same exact merge and unmerge as linear
    layers. Only additive variants that declare the ``"embedding"`` kind adapt embeddings; row
    scales and base rewrites are refused. ``weight`` is the stored table
    (``num_embeddings × embedding_dim``).
    """

    row_scales = False
    base_rewrites = False
    _min_route_dim = 1  # a routed batch of ids may have one id per row

    def __init__(self, base: nn.Embedding, kind: LayerKind):
        super().__init__(base, kind)
        self.num_embeddings = base.num_embeddings
        self.embedding_dim = base.embedding_dim
        self.padding_idx = base.padding_idx
        self.max_norm = None
        self.norm_type = base.norm_type
        self.scale_grad_by_freq = base.scale_grad_by_freq
        self.sparse = base.sparse

    def weight_view(self) -> Tensor:
        return self.stored_weight.t()

    def orient(self, B: Tensor, A: Tensor, g: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        if g is not None:
            raise MergeError("row-scaling updates cannot be merged into an embedding layer")
        return A.t().contiguous(), B.t().contiguous(), None

    def _embed(self, ids: Tensor, table: Tensor, sparse: bool = False) -> Tensor:
        return F.embedding(
            ids, table, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, sparse
        )

    def forward(self, ids: Tensor) -> Tensor:  # type: ignore[override]
        y = self._embed(ids, self.weight, self.sparse)
        if self.merged is not None and self.training and torch.is_grad_enabled():
            self._refuse_training_while_merged()
        if self._routes is not None:
            return self._routed(ids, y)
        out = y
        for adapter in self._run:
            out = out + self._contribution(adapter, ids).to(y.dtype)
        return out

    def _add_routes(self, routes: Sequence[Route], ids: Tensor, y: Tensor) -> None:
        for r in routes:
            _add_rows(y, r, self._contribution(r.adapter, r.take(ids)))

    def _contribution(self, adapter: Variant, ids: Tensor) -> Tensor:
        """``s·Aᵀ[ids]·Bᵀ`` from the adapter's low-rank form, in the adapter dtype."""
        lr = adapter.lowrank()
        if lr.row_scale is not None:
            raise MergeError(
                f"{type(adapter).__name__} scales rows, which an embedding layer cannot apply; "
                "remove 'embedding' from its layer_kinds"
            )
        return F.linear(self._embed(ids, lr.A.t()), lr.B) * lr.scale

    def extra_repr(self) -> str:
        merged = list(self.merged.names) if self.merged else []
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
            f"active={list(self.active)}, merged={merged}"
        )


class EmbeddingKind(LayerKind):
    """``nn.Embedding`` (and subclasses that keep its forward), without ``max_norm``: an embedding
    with ``max_norm`` renormalises rows of its weight in place in its forward, which no merge
    could undo."""

    name = "embedding"
    adapts_as = "embedding"
    linear = False
    host_class = AdaptedEmbedding
    label = "torch.nn.Embedding without max_norm"

    def recognise(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def refusal(self, module: nn.Module) -> str | None:
        if type(module).forward is not nn.Embedding.forward:
            return f"{type(module).__name__} overrides nn.Embedding's forward"
        if module.max_norm is not None:
            return (
                f"max_norm={module.max_norm} renormalises rows of the weight in place on every "
                "lookup, which no merge could undo"
            )
        return None

    def dims(self, module: nn.Module) -> tuple[int, int]:
        return module.embedding_dim, module.num_embeddings

    def weight_view(self, stored: Tensor) -> Tensor:
        return stored.t()

    def example(self, d_in: int, d_out: int, bias: bool, dtype: torch.dtype) -> nn.Module:
        return nn.Embedding(d_in, d_out, dtype=dtype)

    def example_input(self, module: nn.Module, batch: tuple[int, ...], generator: torch.Generator) -> Tensor:
        return torch.randint(0, module.num_embeddings, batch, generator=generator)

    def dense_input(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.one_hot(x, module.num_embeddings)
