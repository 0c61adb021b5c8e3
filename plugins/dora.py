"""DoRA (Liu et al., arXiv 2402.09353): weight-decomposed low-rank adaptation.

Each output row of the adapted weight is split into a trainable magnitude ``m`` and a direction
``W + s·B·A`` that LoRA's factors move::

    W' = k ⊙_row (W + s·B·A),   k = m / n,   n = ‖W + s·B·A‖_row

``m`` (``lora_magnitude_vector``, length ``d_out``) starts at ``n``, computed by the very routine
the forward uses, so ``k`` is exactly 1 and the adapted model starts equal to the base bit for
bit. Following the paper (§4.3) the norm ``n`` is a constant in backward by default
(``detach_norm``): its value tracks ``B·A`` but carries no gradient, which saves memory and time.

The unmerged output is ``k ⊙ (W x + s·B·A·x) + b`` (the bias is not rescaled). Alone on its
layer DoRA finishes the base output in place (:meth:`DoRA.output`); beside other adapters it adds
PEFT's contribution ``(k − 1) ⊙ (W x) + k ⊙ (s·B·A·x)`` with ``W x`` taken from the base output
minus the bias, or recomputed on the dropped input when dropout is active in training.

On a convolution (``nn.Conv1d``/``nn.Conv2d``) ``W`` is the flattened ``out × (in·k…)`` weight,
so ``m`` and the norm are per output channel (PEFT's conv DoRA), and the contribution is
``(k − 1)·conv(x, W) + k·s·B(A(x))`` computed as convolutions (:meth:`DoRA._conv_contribution`);
the fused paths below are for linear layers.

Two things make it cheap:

* **The row norm without ``B·A``.** ``n_i² = ‖W_i‖² + 2s·Σ_k B_ik (W Aᵀ)_ik +
  s²·Σ_kl B_ik (A Aᵀ)_kl B_il`` needs ``O(d_out·r + r²)`` memory beside one pass over ``W``;
  ``‖W_i‖²`` is cached per base weight. Rows where the identity would cancel badly (``W + s·B·A``
  much shorter than ``W`` and ``s·B·A``) are recomputed densely. Tiny layers, where kernel
  launches dominate, form ``W + s·B·A`` directly (:func:`norm_method`).
* **Few passes, and backward keeps what the next operation keeps.** :func:`finish_output` turns
  the base output into the layer output with one elementwise pass and a matmul that accumulates
  into it; :class:`_DoraOutput` keeps that output for backward (``∂L/∂m`` needs
  ``W x + s·B·A·x = (y − b)/k`` per token), and attention or SwiGLU after the layer keep the
  same tensor, so there DoRA costs LoRA's activation memory. The general path
  (:func:`contribution`, :class:`_DoraContribution`) folds ``s·k`` and the bias correction into
  the second low-rank product and keeps the base output in its storage dtype and the rank-``r``
  intermediate, instead of autograd's two fresh ``d_out``-wide fp32 activations.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lorazoo
from lorazoo.claims import Claim, Compare, Ref
from lorazoo.plugin import AdaptedLinear, tensor_version
from lorazoo.plugin import accumulation_dtype as acc_dtype  # norms accumulate where merges do

# Rows whose squared norm is below this share of ‖W_i‖² + ‖s·(BA)_i‖² lose more than two bits
# to cancellation in the identity; they are recomputed from W_i + s·(BA)_i.
CANCEL = 0.25
# Working set of one row chunk when a weight is read in pieces (fp32 bytes).
CHUNK_BYTES = 4 << 20
# Below this many weight elements forming W + s·B·A is faster than the identity's six kernels
# (benchmarks/bench_dora.py, "norm" table).
DENSE_MAX_NUMEL = 1 << 17


@dataclass(frozen=True)
class DoraConfig(lorazoo.VariantConfig):
    """LoRA's ``r`` (default 8), ``alpha`` (default 8) and ``dropout``, plus:

    * ``rslora``: scale ``α/√r`` instead of ``α/r`` (PEFT's ``use_rslora`` with ``use_dora``);
    * ``detach_norm``: treat ``n = ‖W + s·B·A‖_row`` as a constant in backward (paper §4.3,
      PEFT's behaviour; default True). False lets the gradient flow through ``n`` as well.
    """

    rslora: bool = False
    detach_norm: bool = True

    def validate(self) -> None:
        super().validate()
        for name in ("rslora", "detach_norm"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise lorazoo.ConfigError(f"{name} must be True or False, got {value!r}")


# --------------------------------------------------------------------------------------------
# The row norm
# --------------------------------------------------------------------------------------------


def _chunks(weight: Tensor, whole: bool = False) -> list[slice]:
    """Row chunks of at most ``CHUNK_BYTES`` (as fp32) and, unless ``whole``, at most a quarter
    of the rows, so a chunk's fp32 temporary is always smaller than the weight."""
    d_out, d_in = weight.shape
    step = max(1, min(d_out if whole else -(-d_out // 4), CHUNK_BYTES // (4 * max(1, d_in))))
    return [slice(i, min(d_out, i + step)) for i in range(0, d_out, step)]


def row_sq_norms(weight: Tensor) -> Tensor:
    """``‖W_i‖²`` accumulated in fp32 (fp64 for fp64), reading a half-precision weight in row
    chunks so no full-size fp32 copy exists at once."""
    acc = acc_dtype(weight.dtype)
    w = weight.detach()
    return torch.cat([torch.linalg.vecdot(c, c, dim=1) for c in (w[s].to(acc) for s in _chunks(w))])


def _weight_times_at(weight: Tensor, A: Tensor) -> Tensor:
    """``W·Aᵀ`` (``d_out × r``) in ``A``'s dtype; a weight of another dtype is cast in chunks."""
    w = weight.detach()
    if w.dtype == A.dtype:
        return w @ A.T
    return torch.cat([w[s].to(A.dtype) @ A.T for s in _chunks(w)])


def _dense_sq(weight: Tensor, A: Tensor, B: Tensor, scale: float, rows: Tensor | None = None) -> Tensor:
    """``‖W_i + s·B_i·A‖²`` formed directly (for ``rows`` only, when given), in row chunks."""
    w = weight.detach()
    if rows is not None:
        w, B = w[rows], B[rows]
    out = []
    for s in _chunks(w, whole=True):
        v = w[s].to(A.dtype) + scale * (B[s] @ A)
        out.append(torch.linalg.vecdot(v, v, dim=1))
    return torch.cat(out) if out else A.new_zeros(0)


def norm_method(d_out: int, d_in: int) -> str:
    """``"dense"`` for layers so small that launching the identity's kernels costs more than
    forming ``W + s·B·A``; ``"identity"`` otherwise (it never forms a ``d_out × d_in`` tensor)."""
    return "dense" if d_out * d_in <= DENSE_MAX_NUMEL else "identity"


def row_norms(
    weight: Tensor,
    A: Tensor,
    B: Tensor,
    scale: float,
    wsq: Tensor | None = None,
    method: str | None = None,
) -> Tensor:
    """``n = ‖W + s·B·A‖_row`` in fp32 (fp64 for an fp64 weight), differentiable in ``A`` and
    ``B`` (call it under ``torch.no_grad()`` for the detached norm).

    ``wsq`` is ``row_sq_norms(weight)`` when the caller has it cached. ``method`` forces
    ``"identity"`` or ``"dense"``; by default :func:`norm_method` picks by shape.
    """
    acc = acc_dtype(weight.dtype)
    A, B = A.to(acc), B.to(acc)
    method = method or norm_method(*weight.shape)
    if method == "dense":
        n2 = _dense_sq(weight, A, B, scale)
    elif method == "identity":
        t1 = row_sq_norms(weight) if wsq is None else wsq
        t2 = torch.linalg.vecdot(B, _weight_times_at(weight, A), dim=1)
        t3 = torch.linalg.vecdot(B @ (A @ A.T), B, dim=1)
        s2 = scale * scale
        n2 = t1 + (2 * scale) * t2 + s2 * t3
        # Guard the cancellation W_i ≈ −s·(BA)_i: there n² is a small difference of large terms
        # (|2s·t2| ≤ t1 + s²·t3), so its absolute error, ~u·(t1 + s²·t3), would be a large
        # relative one. Such rows are few; recomputing them densely is exact to rounding.
        bad = n2 < CANCEL * (t1 + s2 * t3)
        if bool(bad.any()):
            rows = bad.nonzero().squeeze(1)
            n2 = n2.index_put((rows,), _dense_sq(weight, A, B, scale, rows))
    else:
        raise lorazoo.ConfigError(f"norm method must be 'identity' or 'dense', got {method!r}")
    # n² ≥ 0 in exact arithmetic; rows that are exactly zero keep a finite gradient (sqrt'(0)).
    return torch.sqrt(torch.where(n2 > 0, n2, torch.zeros_like(n2)))


def row_norm_grads(
    weight: Tensor, A: Tensor, B: Tensor, scale: float, n: Tensor, g: Tensor
) -> tuple[Tensor, Tensor]:
    """``(∂A, ∂B)`` of ``Σ_i g_i·n_i`` with ``n = ‖W + s·B·A‖_row``: with ``q = g / n`` (0 on
    rows where ``n = 0``, as :func:`row_norms`' autograd gives) and ``V = W + s·B·A``,
    ``∂B = s·(q ⊙_row V)·Aᵀ`` and ``∂A = s·Bᵀ·(q ⊙_row V)``. ``V`` is formed one row chunk at a
    time (never whole, and nothing weight-sized is kept), so rows where ``W ≈ −s·B·A`` get an
    accurate gradient too. Computed in ``n``'s dtype, returned in the factors' dtypes."""
    acc = n.dtype
    a, b = A.detach().to(acc), B.detach().to(acc)
    q = torch.where(n > 0, g.to(acc) / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(n))
    w = weight.detach()
    gA = torch.zeros_like(a)
    gB = []
    for s in _chunks(w, whole=True):
        qv = q[s].unsqueeze(1) * (w[s].to(acc) + scale * (b[s] @ a))
        gB.append(scale * (qv @ a.T))
        gA = gA.addmm(b[s].T, qv, alpha=scale)
    return gA.to(A.dtype), (torch.cat(gB) if gB else torch.zeros_like(b)).to(B.dtype)


def _traced_row_norms(weight: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    return row_norms(weight, A, B, scale)


def _registered_op() -> Any:
    """The norm operator when this module was already imported once (under another name, or
    reloaded): an operator name can be registered only once per process."""
    try:
        return torch.ops.lorazoo_dora.row_norms
    except (AttributeError, RuntimeError):
        return None


if _registered_op() is not None:
    _traced_row_norms = _registered_op()  # noqa: F811
elif hasattr(torch.library, "custom_op"):
    # Under torch.compile the norm is one opaque operator: its cancellation guard branches on
    # the data, which a traced graph cannot, and its gradient (when the norm is not detached)
    # is :func:`row_norm_grads`, which keeps no weight-sized tensor for backward.
    @torch.library.custom_op("lorazoo_dora::row_norms", mutates_args=())
    def _row_norms_op(weight: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
        with torch.no_grad():
            return row_norms(weight, A, B, scale)

    @_row_norms_op.register_fake
    def _(weight: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
        return weight.new_empty(weight.shape[0], dtype=acc_dtype(weight.dtype))

    def _row_norms_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
        weight, A, B, scale = inputs
        ctx.save_for_backward(weight, A, B, output)
        ctx.scale = scale

    def _row_norms_backward(ctx: Any, g: Tensor) -> tuple:
        weight, A, B, n = ctx.saved_tensors
        gA, gB = row_norm_grads(weight, A, B, ctx.scale, n, g)
        return None, gA, gB, None

    _row_norms_op.register_autograd(_row_norms_backward, setup_context=_row_norms_setup)
    _traced_row_norms = _row_norms_op  # noqa: F811
else:  # older torch: run the norm eagerly (a graph break, with autograd's gradient)
    _traced_row_norms = torch._dynamo.disable(row_norms)  # noqa: F811


def _compiling() -> bool:
    """True while torch.compile traces the forward."""
    check = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return bool(check())


def magnitude_scale(m: Tensor, n: Tensor) -> Tensor:
    """``k = m / n`` in ``m``'s dtype, with ``k = 1`` on rows whose direction is zero (every
    ``k`` gives the same output there; 1 keeps it finite and its gradient defined)."""
    n = n.to(m.dtype)
    ok = n > 0
    return torch.where(ok, m / torch.where(ok, n, torch.ones_like(n)), torch.ones_like(m))


# --------------------------------------------------------------------------------------------
# The contribution and its backward
# --------------------------------------------------------------------------------------------


def _folded(B: Tensor, k: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor | None]:
    """``(s·k) ⊙_row B`` and ``−(k − 1) ⊙ b``: the row scale and the bias correction folded into
    the second low-rank product, so the contribution needs one elementwise pass."""
    Bk = B * (k * scale).unsqueeze(1)
    return Bk, (None if bias is None else -(k - 1) * bias.to(k.dtype))


def contribution(
    x: Tensor, A: Tensor, B: Tensor, k: Tensor, z_src: Tensor, bias: Tensor | None, scale: float
) -> Tensor:
    """``(k − 1) ⊙ (z_src − b) + k ⊙ (s·B·A·x)`` in the adapter dtype, evaluated as
    ``((s·k) ⊙_row B)·(A·x) − (k − 1) ⊙ b + (k − 1) ⊙ z_src``: one matmul with a bias and one
    fused multiply-add over the output, where the literal formula makes five passes (``z_src −
    b``, two products, a sum, and LoRA's ``·s``). At ``k = 1`` and ``B = 0`` every term is an
    exact zero. :class:`_DoraContribution` returns these values bit for bit."""
    with torch.no_grad():
        Bk, b = _folded(B.detach(), k.detach(), bias, scale)
        out = F.linear(F.linear(x.detach(), A.detach()), Bk, b)
        return out.addcmul_(z_src.detach(), (k.detach() - 1))


def _factor_grads(
    g: Tensor,
    x: Tensor,
    A: Tensor,
    B: Tensor,
    k: Tensor,
    h: Tensor,
    s: float,
    need: tuple[bool, ...],
    p: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``(∂x, ∂A, ∂B, P)`` of a term ``((s·k) ⊙_row B)·(A·x)`` for the output gradient ``g``
    (tokens × d_out), as ``need = (x, A, B)`` asks, with ``P = gᵀ·h`` when ``∂B`` or ``p`` wants
    it. ``∂x`` comes back in ``x``'s dtype and shape."""
    need_x, need_a, need_b = need
    gx = ga = gb = None
    P = g.T @ h.reshape(-1, h.shape[-1]) if (need_b or p) else None
    if need_b:
        gb = (s * k).unsqueeze(1) * P
    if need_x or need_a:
        gh = g @ (B * (s * k).unsqueeze(1))
        if need_a:
            ga = gh.T @ x.reshape(-1, x.shape[-1]).to(A.dtype)
        if need_x:
            gx = (gh @ A).reshape(x.shape).to(x.dtype)
    return gx, ga, gb, P


class _DoraContribution(torch.autograd.Function):
    """:func:`contribution` with a backward that keeps the base output in its storage dtype and
    the ``r``-wide intermediate ``h = A·x``, rather than autograd's fp32 copies of ``W x`` and
    ``s·B·A·x`` (two ``d_out``-wide activations per layer).

    With ``G`` the output gradient (tokens × d_out) and ``P = Gᵀ·h`` (d_out × r):
    ``∂B = s·k ⊙_row P``, ``∂h = G·((s·k) ⊙_row B)``, ``∂A = ∂hᵀ·x``, ``∂x = ∂h·A``,
    ``∂k = Σ_t G ⊙ (z_src − b) + s·Σ_k B ⊙ P`` (the second term is ``Σ_t G ⊙ s·B·A·x``
    without forming it), ``∂z_src = (k − 1) ⊙ G``, ``∂b = −(k − 1) ⊙ Σ_t G``.
    """

    @staticmethod
    def forward(ctx: Any, x, A, B, k, z_src, bias, scale):  # type: ignore[override]
        Bk, b = _folded(B, k, bias, scale)
        h = F.linear(x, A)
        out = F.linear(h, Bk, b).addcmul_(z_src, k - 1)
        ctx.save_for_backward(x, A, B, k, z_src, bias, h)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad):  # type: ignore[override]
        x, A, B, k, z_src, bias, h = ctx.saved_tensors
        s = ctx.scale
        need_x, need_a, need_b, need_k, need_z, need_bias = ctx.needs_input_grad[:6]
        d_out = B.shape[0]
        g = grad.reshape(-1, d_out)
        gk = gz = gbias = None
        gx, ga, gb, p = _factor_grads(g, x, A, B, k, h, s, (need_x, need_a, need_b), p=need_k)
        g_sum = g.sum(0) if (bias is not None and (need_k or need_bias)) else None
        if need_k:
            gk = torch.linalg.vecdot(
                g, z_src.reshape(-1, d_out).to(g.dtype), dim=0
            ) + s * torch.linalg.vecdot(B, p, dim=1)
            if g_sum is not None:
                gk = gk - g_sum * bias.to(gk.dtype)
        if need_z:
            gz = (grad * (k - 1)).to(z_src.dtype)
        if need_bias:
            gbias = (-(k - 1) * g_sum).to(bias.dtype)
        return gx, ga, gb, gk, gz, gbias, None


def recoverable(k: Tensor, bias: Tensor | None) -> bool:
    """Whether backward may recover ``u = W x + s·B·A·x`` from the output as ``(y − b)/k``
    without losing accuracy: every ``k`` finite and non-zero, and, with a bias (whose rounding
    in ``y`` the division magnifies by ``1/|k|``), ``|k| ≥ 1/2``. ``k`` starts at exactly 1 and
    stays near it in training; a layer outside this range keeps ``W x`` for backward instead."""
    a = k.abs()
    ok = torch.isfinite(a) & ((a >= 0.5) if bias is not None else (a > 0))
    return bool(ok.all())


def finish_output(
    x: Tensor, A: Tensor, B: Tensor, k: Tensor, y: Tensor, bias: Tensor | None, scale: float
) -> Tensor:
    """Turn the base output ``y = W x + b`` into DoRA's output ``k ⊙ (W x + s·B·A·x) + b`` in
    place, and return ``h = A·x``.

    When ``y`` is contiguous and shares the adapter dtype: ``y ← k ⊙ y``, then
    ``y += h·((s·k) ⊙_row B)ᵀ`` accumulated by the matmul itself, and with a bias
    ``y += (1 − k) ⊙ b``: one elementwise pass over the output beside the two rank-``r``
    products, and no output-sized temporary. Otherwise (a half-precision base with fp32
    adapters) the contribution is formed in the adapter dtype by :func:`contribution`'s
    operations and added in ``y``'s dtype, bit for bit what the general path gives. At ``k = 1``
    and ``B = 0`` every added term is an exact zero."""
    d_out, r = B.shape
    h = F.linear(x.to(A.dtype), A)
    Bk, b = _folded(B, k, bias, scale)  # b = −(k − 1) ⊙ bias = (1 − k) ⊙ bias
    if y.dtype == A.dtype and y.is_contiguous():
        y.mul_(k)
        y.view(-1, d_out).addmm_(h.reshape(-1, r), Bk.T)
        if b is not None:
            y.add_(b)
    else:
        y.add_(F.linear(h, Bk, b).addcmul_(y, k - 1).to(y.dtype))
    return h


class _DoraOutput(torch.autograd.Function):
    """:func:`finish_output` with a backward that keeps the layer's output ``y`` itself (in place
    of the base output), the input and ``h = A·x``. The operation after the layer often saves
    ``y`` anyway (attention saves its values, SwiGLU both of its inputs), and then the two share
    one tensor: where they do, DoRA costs LoRA's activation memory.

    With ``G`` the output gradient, ``u = (y − b)/k`` (``W x + s·B·A·x``) and ``P = Gᵀ·h``:
    ``∂z = k ⊙ G`` (to the base output), ``∂k = Σ_t G ⊙ u = (Σ_t G ⊙ y − b ⊙ Σ_t G)/k``,
    ``∂B = s·k ⊙_row P``, ``∂h = G·((s·k) ⊙_row B)``, ``∂A = ∂hᵀ·x``, ``∂x = ∂h·A``,
    ``∂b = (1 − k) ⊙ Σ_t G`` (the rest of ``b``'s gradient reaches it through ``z``).
    Callers check :func:`recoverable` first.

    ``z``, the tensor finished in place, is the *first* argument: when it is a view (``F.linear``
    returns one for a contiguous 3-d input with a bias), autograd routes the gradient of its
    base through the first gradient ``backward`` returns.
    """

    @staticmethod
    def forward(ctx: Any, z, x, A, B, k, bias, scale):  # type: ignore[override]
        h = finish_output(x, A, B, k, z, bias, scale)
        ctx.mark_dirty(z)
        ctx.save_for_backward(x, A, B, k, bias, h, z)
        ctx.scale = scale
        return z

    @staticmethod
    def backward(ctx: Any, grad):  # type: ignore[override]
        x, A, B, k, bias, h, y = ctx.saved_tensors
        s = ctx.scale
        need_z, need_x, need_a, need_b, need_k, need_bias = ctx.needs_input_grad[:6]
        d_out = B.shape[0]
        g = grad.reshape(-1, d_out).to(A.dtype)
        gk = gz = gbias = None
        gx, ga, gb, _ = _factor_grads(g, x, A, B, k, h, s, (need_x, need_a, need_b), p=False)
        g_sum = g.sum(0) if (bias is not None and (need_k or need_bias)) else None
        if need_k:
            gk = torch.linalg.vecdot(g, y.reshape(-1, d_out).to(g.dtype), dim=0)
            if g_sum is not None:
                gk = gk - g_sum * bias.to(gk.dtype)
            gk = gk / k
        if need_z:
            gz = (grad * k).to(y.dtype)
        if need_bias:
            gbias = ((1 - k) * g_sum).to(bias.dtype)
        return gz, gx, ga, gb, gk, gbias, None


# --------------------------------------------------------------------------------------------
# The variant
# --------------------------------------------------------------------------------------------


def _on_conv(host: Any) -> bool:
    """True on a convolution host (its layer kind adapts as ``"conv"``)."""
    kind = getattr(host, "kind", None)
    return getattr(kind, "adapts_as", None) == "conv"


class DoRA(lorazoo.LowRankAdapter):
    """LoRA's ``A`` and ``B`` plus a trainable magnitude ``m`` per output row; see the module
    docstring for the math. Trainable parameters per layer: ``r·(d_in + d_out) + d_out``."""

    name = "dora"
    claims = (
        Claim(
            "learns at least as much as LoRA at equal rank (within 0.01 bpb)",
            paper="Liu et al., arXiv 2402.09353",
            checks=(Compare("learned_bpb", Ref("dora"), ">", Ref("lora"), slack=0.01),),
        ),
    )
    config_class = DoraConfig
    # On a convolution (``nn.Conv1d``/``nn.Conv2d``) the norm runs over each output channel of
    # the flattened ``out × (in·k…)`` weight (PEFT's conv DoRA); see :meth:`_conv_contribution`.
    layer_kinds = frozenset({"linear", "conv"})
    # The paper trains DoRA with the learning rates it uses for LoRA at the same rank, and m's
    # AdamW steps move each row's scale by about lr / ‖W_i‖ (‖W_i‖ is O(1) here), a fraction of
    # a percent per step at 1e-3; so DoRA keeps LoRA's rate.
    recommended_lr = 1e-3

    def __init__(self, layer: lorazoo.LayerInfo, config: DoraConfig, shared: nn.Module | None = None):
        super().__init__(layer, config, shared)
        # slot -> (weakref to the base weight, key, value); see _base_key. Derived values only:
        # copies and pickles start without it (__getstate__).
        self._cache: dict[str, tuple] = {}
        n = self._initial_norm(layer.weight)
        # m = n from the routine the forward uses: k = m/n is exactly 1 at initialisation.
        self.lora_magnitude_vector = nn.Parameter(n.to(layer.adapter_dtype).clone())

    @torch.no_grad()  # as a decorator: grad mode comes back in torch's frame, even on an interrupt
    def _initial_norm(self, weight: Tensor) -> Tensor:
        return self._norm(weight)

    @property
    def scale(self) -> float:
        cfg = self.config
        return cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)

    @classmethod
    def num_trainable(cls, d_in: int, d_out: int, config: lorazoo.VariantConfig) -> int:
        return config.r * (d_in + d_out) + d_out

    def __getstate__(self) -> dict[str, Any]:
        # The cache holds weak references (which cannot be pickled) to the live base weight;
        # a copy recomputes its values from its own weight.
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    # ---- norms ----------------------------------------------------------------------------

    def _base_key(self, weight: Tensor) -> tuple | None:
        """What identifies the contents of the host's base weight: its storage, version counter
        (which every in-place change moves, the engine's merges and base rewrites included),
        dtype, device and layout. The entry holds the weight weakly and checks it is the same
        object, so a freed weight's address cannot be mistaken for a live one.

        None (nothing is cached) when the weight or a factor was made under
        ``torch.inference_mode()``: such tensors have no version counter to key on."""
        if any(t.is_inference() for t in (weight, self.lora_A, self.lora_B)):
            return None
        return (
            weight.data_ptr(),
            tensor_version(weight),  # None for an inference tensor: never cached
            weight.dtype,
            weight.device,
            tuple(weight.shape),
            weight.stride(),
        )

    def _cached(self, slot: str, key: tuple | None, weight: Tensor) -> Tensor | None:
        entry = self._cache.get(slot)
        if key is None or None in key or entry is None:
            return None
        if entry[0]() is weight and entry[1] == key:
            return entry[2]
        return None

    def _store(self, slot: str, key: tuple | None, weight: Tensor, value: Tensor) -> None:
        if key is not None:
            self._cache[slot] = (weakref.ref(weight), key, value)

    def _wsq(self, weight: Tensor, base: tuple | None) -> Tensor:
        """``‖W_i‖²`` of the host's base weight, computed once per weight version."""
        wsq = self._cached("wsq", base, weight)
        if wsq is None:
            wsq = row_sq_norms(weight)
            self._store("wsq", base, weight, wsq)
        return wsq

    def _detached_norm(self, weight: Tensor) -> Tensor:
        """``n`` without gradient, recomputed only when the base weight or a factor changed
        (every optimizer step bumps the factors' version counters; inference reuses it)."""
        A, B = self.lora_A, self.lora_B
        if _compiling():
            # A traced graph cannot key a cache on storage addresses and version counters; the
            # norm is one operator of the graph, computed every call.
            return _traced_row_norms(weight.detach(), A.detach(), B.detach(), self.scale)
        base = self._base_key(weight)
        key = None
        if base is not None:
            key = (*base, A.data_ptr(), tensor_version(A), B.data_ptr(), tensor_version(B), self.scale)
        n = self._cached("norm", key, weight)
        if n is None:
            wsq = self._wsq(weight, base) if norm_method(*weight.shape) == "identity" else None
            with torch.no_grad():
                n = self._norm(weight, wsq)
            self._store("norm", key, weight, n)
        return n

    def _norm(self, weight: Tensor, wsq: Tensor | None = None) -> Tensor:
        return row_norms(weight, self.lora_A, self.lora_B, self.scale, wsq=wsq)

    def row_scale(self, weight: Tensor) -> Tensor:
        """``k = m / ‖W + s·B·A‖_row`` for ``weight``, without gradient."""
        with torch.no_grad():
            return magnitude_scale(self.lora_magnitude_vector, self._norm(weight))

    # ---- the interface ------------------------------------------------------------------

    def lowrank(self, weight: Tensor | None = None) -> lorazoo.LowRank:
        c = None if weight is None else self.row_scale(weight)
        return lorazoo.LowRank(self.lora_A, self.lora_B, self.scale, row_scale=c)

    def _k(self, weight: Tensor) -> Tensor:
        """``k = m / n`` for the forward: ``n`` detached and cached unless ``detach_norm`` is
        off while training."""
        if self.config.detach_norm or not torch.is_grad_enabled():
            n = self._detached_norm(weight)
        elif _compiling():
            n = _traced_row_norms(weight.detach(), self.lora_A, self.lora_B, self.scale)
        else:
            base = self._base_key(weight)
            wsq = self._wsq(weight, base) if norm_method(*weight.shape) == "identity" else None
            n = self._norm(weight, wsq)
        return magnitude_scale(self.lora_magnitude_vector, n)

    def output(self, x: Tensor, base_out: Tensor, host: AdaptedLinear) -> Tensor:
        """The whole layer output when DoRA runs alone on the layer: finished in place on the
        base output (:func:`finish_output`), whose result backward keeps instead of a separate
        copy of ``W x``. Dropout in training, autocast, adapters on another device and, when
        training, a ``k`` that :func:`recoverable` rejects take the general path,
        ``base_out + forward(...)``. So does a forward traced by ``torch.compile``: the traced
        graph is functional (no output finished in place), and :func:`recoverable` is a branch
        on the data."""
        A = self.lora_A
        if _on_conv(host):  # a convolution: the general path
            return base_out + self.forward(x, base_out, host).to(base_out.dtype)
        if (
            _compiling()
            or (self.training and self.config.dropout > 0)
            or A.device != base_out.device
            or torch.is_autocast_enabled(base_out.device.type)
        ):
            return super().output(x, base_out, host)
        k = self._k(host.weight)
        B, bias = self.lora_B, host.bias
        tensors = (x, A, B, k, base_out) + ((bias,) if bias is not None else ())
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            if not recoverable(k, bias):
                return base_out + self._contribution(x, base_out, host, k).to(base_out.dtype)
            return _DoraOutput.apply(base_out, x, A, B, k, bias, self.scale)
        with torch.no_grad():
            finish_output(x, A, B, k, base_out, bias, self.scale)
        return base_out

    def forward(self, x: Tensor, base_out: Tensor, host: AdaptedLinear) -> Tensor:
        if _on_conv(host):
            return self._conv_contribution(x, base_out, host)
        return self._contribution(x, base_out, host, self._k(host.weight))

    def _conv_contribution(self, x: Tensor, base_out: Tensor, host: Any) -> Tensor:
        """On a convolution host: ``(k − 1)·conv(x, W) + k·s·B(A(x))`` per output channel, with
        ``conv(x, W)`` the base output without its bias, recomputed on the dropped input when
        dropout is active in training (PEFT's conv DoRA)."""
        k = self._k(host.weight_view())
        A, B = self.lora_A, self.lora_B
        xa = x.to(A.dtype)
        if self.training and self.config.dropout > 0:
            xa = self.dropout(xa)
            z = host.conv_without_bias(xa).to(A.dtype)
        else:
            z = base_out.to(A.dtype)
            if host.bias is not None:
                z = z - host.bias.to(A.dtype).view(-1, *(1,) * (z.dim() - 2))
        kk = k.view(-1, *(1,) * (z.dim() - 2))
        return (kk - 1) * z + kk * host.lowrank_conv(xa, A, B, self.scale)

    def _contribution(self, x: Tensor, base_out: Tensor, host: AdaptedLinear, k: Tensor) -> Tensor:
        weight = host.weight
        A, B = self.lora_A, self.lora_B
        xa = x.to(A.dtype)
        if self.training and self.config.dropout > 0:
            # W·drop(x) is recomputed on the dropped input (PEFT and the authors' code).
            xa = self.dropout(xa)
            z_src, bias = F.linear(xa.to(weight.dtype), weight), None
        else:
            z_src, bias = base_out, host.bias
        tensors = (xa, A, B, k, z_src) + ((bias,) if bias is not None else ())
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return _DoraContribution.apply(xa, A, B, k, z_src, bias, self.scale)
        return contribution(xa, A, B, k, z_src, bias, self.scale)


@lorazoo.hookimpl
def lorazoo_variants() -> list[type[lorazoo.Variant]]:
    return [DoRA]
