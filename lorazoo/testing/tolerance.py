"""The floating-point tolerance model for merged-versus-unmerged comparisons (docs/spec/variants.md §11).

Merged and unmerged paths compute the same real number in different orders, so their difference
is bounded by rounding in proportion to the *magnitudes* entering the sums, not to ``|y|``:

    |y_merged − y_unmerged|_i ≤ τ_i = C·(ρ·u_s + γ_K(u_a))·M_i + η_i

with ``M_i = Σ_j|W_ij||x_j| + |b_i| + Σ_a [|c_a,i|·|s_a|·Σ_k|B_a,ik|·Σ_j|A_a,kj||x_j|
+ |c_a,i − 1|·(Σ_j|W_ij||x_j| + |b_i|)]`` computed in fp64 from the actual tensors, ``u_s`` the unit
roundoff of the storage dtype, ``u_a`` that of the accumulation, ``γ_K(u) = K·u/(1 − K·u)``
with ``K = d_in + max r + 1``, ``ρ = 8`` roundings, safety factor ``C = 2`` and
``η_i = ρ·σ·(1 + Σ_j|x_j|)`` for gradual underflow (σ = smallest subnormal).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..variant import LowRank

RHO = 8
SAFETY = 2


def unit_roundoff(dtype: torch.dtype) -> float:
    """``eps / 2`` of a floating dtype (fp32: 2^-24, bf16: 2^-8, fp16: 2^-11)."""
    return torch.finfo(dtype).eps / 2


def smallest_subnormal(dtype: torch.dtype) -> float:
    fi = torch.finfo(dtype)
    return fi.smallest_normal * fi.eps


def accumulation_roundoff(dtype: torch.dtype, device: torch.device | str = "cpu") -> float:
    """Unit roundoff of the matmul accumulation for inputs of ``dtype`` on ``device``."""
    if dtype == torch.float64:
        return unit_roundoff(torch.float64)
    if torch.device(device).type == "cuda":
        if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
            return 2.0**-11  # TF32
        if dtype == torch.float16 and torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction:
            return unit_roundoff(dtype)
        if dtype == torch.bfloat16 and torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction:
            return unit_roundoff(dtype)
    return unit_roundoff(torch.float32)


def magnitude(x: Tensor, weight: Tensor, bias: Tensor | None, adapters: Sequence[LowRank]) -> Tensor:
    """``M`` of §11.1 for every output element, in fp64."""
    ax = x.detach().double().abs()
    aw = weight.detach().double().abs()
    wx = ax @ aw.T
    m = wx.clone()
    # |W x| + |b|: the size of the base output. A row-scaling variant (c ≠ 1) recovers W x from
    # the rounded base output, so that output's rounding error reaches y multiplied by c − 1.
    base = wx
    if bias is not None:
        base = wx + bias.detach().double().abs()
        m = base.clone()
    for lr in adapters:
        c = (
            lr.row_scale.detach().double()
            if lr.row_scale is not None
            else torch.ones(weight.shape[0], dtype=torch.float64, device=weight.device)
        )
        low = (ax @ lr.A.detach().double().abs().T) @ lr.B.detach().double().abs().T
        m = m + c.abs() * abs(float(lr.scale)) * low + (c - 1).abs() * base
    return m


def merge_tolerance(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    adapters: Sequence[LowRank],
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``τ`` for every output element of one layer (same shape as the layer output)."""
    dtype = dtype or weight.dtype
    u_s = unit_roundoff(dtype)
    u_a = accumulation_roundoff(dtype, weight.device)
    k = weight.shape[1] + max((lr.A.shape[0] for lr in adapters), default=0) + 1
    gamma = k * u_a / (1 - k * u_a)
    m = magnitude(x, weight, bias, adapters)
    eta = RHO * smallest_subnormal(dtype) * (1 + x.detach().double().abs().sum(-1, keepdim=True))
    return SAFETY * (RHO * u_s + gamma) * m + eta
