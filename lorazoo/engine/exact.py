"""Exactly reversible in-place weight updates, without a copy of the weight.

An update sets ``W ← cast(g ⊙_row W + Bc·Ac)``, formed in fp32 (fp64 for an fp64 weight) and cast
once. Undoing it by arithmetic, ``cast((W' − Bc·Ac) / g)``, is only within rounding of ``W``. So
while updating, we compute what that undo *will* give and record, per element, the difference of
the IEEE bit patterns of the original and the undone value (integers, almost always tiny). They are
kept as int8: densely (1 byte per element) or, when few are non-zero, as (index, int8) pairs,
whichever is smaller. Elements whose difference does not fit int8 (an original many orders of
magnitude smaller than its update, so its bits are lost in ``W'``) keep their original bit pattern
in a sparse list. The revert recomputes the same undo and adds the differences back, which gives
the original bits exactly.

The revert must recompute the undo bit for bit, so both directions share one code path, one row
partition and the same factor tensors. Callers check, with :func:`fingerprint`, that the factors
did not change in between.

Work is done in row chunks sized to stay in cache: the weight is read and written once, and the
update ``Bc·Ac`` is never materialised at full size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_BITS = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}
_CHUNK_BYTES = 1 << 20  # fp32 working set of one row chunk (~1 MiB keeps it in L2)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for a weight of ``dtype``: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(d_out: int, d_in: int) -> int:
    return max(1, min(d_out, _CHUNK_BYTES // (4 * max(1, d_in))))


@dataclass
class Residual:
    """Bit-pattern corrections that turn an arithmetic undo into an exact one."""

    numel: int
    dense: Tensor | None  # int8 [numel], or None when stored sparsely
    index: Tensor | None  # positions of non-zero corrections (sparse form)
    values: Tensor | None  # int8 corrections at ``index`` (sparse form)
    wide_index: Tensor  # positions whose correction does not fit int8
    wide_bits: Tensor  # original bit patterns at ``wide_index``

    @property
    def nbytes(self) -> int:
        """Bytes held for this weight while the update is applied."""
        parts = (self.dense, self.index, self.values, self.wide_index, self.wide_bits)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def bytes_per_element(self) -> float:
        return self.nbytes / max(1, self.numel)

    @property
    def n_wide(self) -> int:
        return int(self.wide_index.numel())


def _factors(B: Tensor, A: Tensor, g: Tensor | None, acc: torch.dtype, device: torch.device):
    B = B.to(device=device, dtype=acc)
    A = A.to(device=device, dtype=acc)
    if g is not None:
        g = g.to(device=device, dtype=acc).unsqueeze(1)
    return B, A, g


def _undo_chunk(merged: Tensor, B: Tensor, A: Tensor, g: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The arithmetic undo of one chunk, ``cast((W' − B·A) / g)``; shared by both directions."""
    d = B @ A
    back = merged.to(d.dtype) - d
    if g is not None:
        back = back / g
    return back.to(dtype)


@torch.no_grad()
def apply_update(weight: Tensor, B: Tensor, A: Tensor, g: Tensor | None = None) -> Residual:
    """``weight ← cast(g ⊙_row weight + B·A)`` in place; returns what :func:`revert_update`
    needs to restore ``weight`` bit for bit. ``weight`` is ``d_out × d_in``; ``B`` is
    ``d_out × k``, ``A`` is ``k × d_in``, ``g`` (optional) has length ``d_out``."""
    dtype = weight.dtype
    if dtype not in _BITS:
        raise TypeError(f"exact updates support float32/float64/bfloat16/float16, not {dtype}")
    acc = acc_dtype(dtype)
    d_out, d_in = weight.shape
    B, A, g = _factors(B, A, g, acc, weight.device)
    ibits = _BITS[dtype]
    numel = weight.numel()
    dense = torch.empty(numel, dtype=torch.int8, device=weight.device)
    itype = torch.int32 if numel < 2**31 else torch.int64
    wide_index: list[Tensor] = []
    wide_bits: list[Tensor] = []
    step = chunk_rows(d_out, d_in)
    for start in range(0, d_out, step):
        stop = min(d_out, start + step)
        w = weight[start:stop]
        b = B[start:stop]
        gc = g[start:stop] if g is not None else None
        d = b @ A
        w_acc = w.to(acc)
        merged = torch.addcmul(d, w_acc, gc) if gc is not None else w_acc + d
        merged = merged.to(dtype)
        back = _undo_chunk(merged, b, A, gc, dtype)
        # bits(original) - bits(undo), wrapping in the native integer width; restoring adds it
        # back with the same wrap, so the round trip is exact even across sign changes.
        diff = (w.contiguous().view(ibits) - back.view(ibits)).reshape(-1)
        small = (diff >= -128) & (diff <= 127)
        lo, hi = start * d_in, stop * d_in
        dense[lo:hi] = torch.where(small, diff, torch.zeros_like(diff)).to(torch.int8)
        if not bool(small.all()):
            idx = torch.nonzero(~small).squeeze(1)
            wide_index.append((idx + lo).to(itype))
            wide_bits.append(w.contiguous().view(ibits).reshape(-1)[idx].clone())
        w.copy_(merged)
    device = weight.device
    res = Residual(
        numel=numel,
        dense=dense,
        index=None,
        values=None,
        wide_index=torch.cat(wide_index) if wide_index else torch.empty(0, dtype=itype, device=device),
        wide_bits=torch.cat(wide_bits) if wide_bits else torch.empty(0, dtype=ibits, device=device),
    )
    nz = torch.nonzero(dense).squeeze(1)
    if nz.numel() * (itype.itemsize + 1) < numel:  # (index, int8) pairs beat one byte each
        res.index = nz.to(itype)
        res.values = dense[nz].clone()
        res.dense = None
    return res


@torch.no_grad()
def revert_update(weight: Tensor, B: Tensor, A: Tensor, g: Tensor | None, residual: Residual | None) -> None:
    """Undo :func:`apply_update` in place. With ``residual`` the original bits come back exactly;
    with ``None`` the undo is plain arithmetic (within rounding)."""
    dtype = weight.dtype
    acc = acc_dtype(dtype)
    d_out, d_in = weight.shape
    B, A, g = _factors(B, A, g, acc, weight.device)
    ibits = _BITS[dtype]
    dense = residual.dense if residual is not None else None
    step = chunk_rows(d_out, d_in)
    for start in range(0, d_out, step):
        stop = min(d_out, start + step)
        w = weight[start:stop]
        back = _undo_chunk(w, B[start:stop], A, g[start:stop] if g is not None else None, dtype)
        if dense is not None:
            corr = dense[start * d_in : stop * d_in].view(stop - start, d_in).to(ibits)
            back = (back.view(ibits) + corr).view(dtype)
        w.copy_(back)
    if residual is None:
        return
    flat = weight.view(-1).view(ibits) if weight.is_contiguous() else None
    if flat is None:
        raise RuntimeError("exact revert needs a contiguous weight")
    if residual.index is not None and residual.index.numel():
        idx = residual.index.long()
        flat[idx] += residual.values.to(ibits)
    if residual.n_wide:
        flat[residual.wide_index.long()] = residual.wide_bits


def fingerprint(*tensors: Tensor | None) -> tuple:
    """A cheap identity of tensors' contents: storage, version counter, shape, dtype.

    Any in-place change (an optimizer step, ``copy_``, a load) bumps the version counter.
    """
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        out.append((t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device))
    return tuple(out)
