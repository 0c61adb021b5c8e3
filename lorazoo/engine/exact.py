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
partition and the same factor tensors: callers keep the factors they applied (they are
adapter-sized) and revert with those, whatever happened to the adapter since.

Each direction is all or nothing. Rows are written one chunk at a time; if anything is raised
between two chunks (:func:`lorazoo.engine._interrupt.checkpoint` marks those points), the rows
already written are put back exactly before the exception propagates: an interrupted update is
reverted with the part of the record made so far, an interrupted revert is re-applied (the same
operations on the restored originals give the same merged bits).

Work is done in row chunks sized to stay in cache: the weight is read and written once, and the
update ``Bc·Ac`` is never materialised at full size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _interrupt
from .distributed import local_view

_BITS = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}
_CHUNK_BYTES = 1 << 20  # bytes of one acc-dtype row chunk (bench_merge.py: fewer calls beat staying in L2)
_BLOCK = 64  # elements per block when screening a chunk for wide entries
_CHUNK_BYTES_CUDA = 1 << 26  # on a GPU, large chunks: the per-chunk range check synchronises


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for a weight of ``dtype``: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(d_out: int, d_in: int, device: torch.device | None = None, itemsize: int = 4) -> int:
    """Rows per chunk. Both directions must use the same partition (the undo is recomputed)."""
    budget = _CHUNK_BYTES_CUDA if device is not None and device.type == "cuda" else _CHUNK_BYTES
    return max(1, min(d_out, budget // (itemsize * max(1, d_in))))


@dataclass
class Residual:
    """Bit-pattern corrections that turn an arithmetic undo into an exact one."""

    numel: int
    dense: Tensor | None  # int8 [numel], or None when stored sparsely
    index: Tensor | None  # positions of non-zero corrections (sparse form)
    values: Tensor | None  # int8 corrections at ``index`` (sparse form)
    wide_index: Tensor  # positions whose correction does not fit int8
    wide_bits: Tensor  # original bit patterns at ``wide_index``
    merged_sum: int = 0  # :func:`content_sum` of the weight as the update left it

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
        g = g.to(device=device, dtype=acc)
        g = g.unsqueeze(1) if g.dim() == 1 else g
    return B, A, g


class _Work:
    """Chunk-sized scratch buffers, allocated once per call and reused for every chunk.

    Fresh temporaries per chunk would each be a new allocation (for large ones, new pages the
    kernel must zero), which costs more than the arithmetic; ``out=`` into these keeps the
    working set in cache and the weight read and written once.
    """

    def __init__(self, rows: int, d_in: int, dtype: torch.dtype, acc: torch.dtype, device: torch.device):
        self.d = torch.empty(rows, d_in, dtype=acc, device=device)  # B·A, then the undo
        self.m = torch.empty(rows, d_in, dtype=acc, device=device)  # merged, in acc
        low = dtype != acc
        self.m_lp = torch.empty(rows, d_in, dtype=dtype, device=device) if low else None
        self.b_lp = torch.empty(rows, d_in, dtype=dtype, device=device) if low else None

    def take(self, rows: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[:rows]

        return self.d[:rows], self.m[:rows], cut(self.m_lp), cut(self.b_lp)


def _undo_into(merged: Tensor, d: Tensor, g: Tensor | None, back_lp: Tensor | None) -> Tensor:
    """The arithmetic undo ``cast((W' − B·A) / g)`` of one chunk, shared by both directions.

    ``d`` holds ``B·A`` on entry. The undo is formed in the accumulation dtype; for a
    low-precision weight it is cast into ``back_lp`` (in the same operation when there is no
    row scale: the subtraction computes in fp32 and rounds once on the write). Returns the undo
    in the weight dtype; ``d`` is clobbered.
    """
    if back_lp is not None and g is None:
        return torch.sub(merged, d, out=back_lp)
    torch.sub(merged, d, out=d)
    if g is not None:
        d.div_(g)
    if back_lp is None:
        return d
    back_lp.copy_(d)
    return back_lp


def _out_of_int8(diff: Tensor, lo: int | None = None, hi: int | None = None) -> Tensor:
    """Flat positions of the entries of ``diff`` outside ``[-128, 127]``.

    They are few (elements whose update dwarfs them), so blocks of 64 are screened first with
    one reduction (per block maximum and/or minimum, as ``diff``'s overall minimum ``lo`` and
    maximum ``hi`` require) and only blocks that hold any are searched element by element.
    """
    flat = diff.reshape(-1)
    n = flat.numel()
    if n % _BLOCK:
        return torch.nonzero((flat < -128) | (flat > 127)).squeeze(1)
    if lo is None or hi is None:
        lo, hi = (int(v) for v in torch.aminmax(flat))
    blocks = flat.view(-1, _BLOCK)
    if hi > 127 and lo < -128:
        hot = torch.nonzero((blocks.amax(1) > 127) | (blocks.amin(1) < -128)).squeeze(1)
    elif hi > 127:
        hot = torch.nonzero(blocks.amax(1) > 127).squeeze(1)
    else:
        hot = torch.nonzero(blocks.amin(1) < -128).squeeze(1)
    sub = blocks[hot]
    hit = torch.nonzero((sub < -128) | (sub > 127))
    return hot[hit[:, 0]] * _BLOCK + hit[:, 1]


def _sparse_pays(dense: Tensor, pair_bytes: int) -> bool:
    """True when (index, int8) pairs take fewer bytes than one byte per element.

    Counting every non-zero costs more than the merge's arithmetic, so a strided sample
    decides first; only a sample near the break-even share leads to the full count.
    """
    numel = dense.numel()
    sample = dense[:: max(1, numel // 65536)]
    share = float(torch.count_nonzero(sample)) / max(1, sample.numel())
    if share > 2.0 / pair_bytes:  # clearly dense: twice the break-even share
        return False
    if share < 0.25 / pair_bytes:  # clearly sparse (the caller checks the real size)
        return True
    return int(torch.count_nonzero(dense)) * pair_bytes < numel


def _nonzero_int8(flat: Tensor) -> Tensor:
    """Positions of the non-zero entries of a 1-D int8 tensor, ascending.

    ``torch.nonzero`` costs several ns per element scanned, more than the whole merge's
    arithmetic. Scanning 8-byte words instead visits an eighth of the entries; only the few
    words that hold a non-zero byte are then searched byte by byte.
    """
    n = flat.numel()
    head = n - n % 8
    if head == 0 or flat.storage_offset() % 8:
        return torch.nonzero(flat).squeeze(1)
    words = flat[:head].view(torch.int64)
    hot = torch.nonzero(words).squeeze(1)
    hit = torch.nonzero(words[hot].view(torch.int8).view(-1, 8))
    found = hot[hit[:, 0]] * 8 + hit[:, 1]
    if head < n:
        found = torch.cat([found, torch.nonzero(flat[head:]).squeeze(1) + head])
    return found


def _bounds(index: Tensor | None, d_in: int, starts: list[int]) -> list[int] | None:
    """Positions in the ascending flat ``index`` where each row chunk starts (and the end)."""
    if index is None or not index.numel():
        return None
    edges = torch.tensor([s * d_in for s in starts], dtype=index.dtype, device=index.device)
    return [*torch.searchsorted(index, edges).tolist(), index.numel()]


def _same_bits(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype]))


_MASK = (1 << 32) - 1


def _bits_sum(t: Tensor) -> int:
    """Sum of the IEEE bit patterns of ``t``'s elements modulo 2³², the same for any layout and
    any partition into chunks (modular addition is associative). Summed in int32 (wrapping),
    which vectorises; an int64 sum costs as much as the whole merge's arithmetic."""
    bits = t.view(_BITS[t.dtype])
    return int(bits.sum(dtype=torch.int32 if bits.dtype != torch.int64 else torch.int64)) & _MASK


def content_sum(weight: Tensor) -> int:
    """A checksum of a weight's contents, equal to the one :func:`apply_update` records for what it
    wrote. Unlike a storage address or a version counter it survives copies, pickling and moves."""
    w = weight.detach()
    if w.dtype not in _BITS:
        return -1
    return _bits_sum(w if w.is_contiguous() else w.contiguous())


def _cat(parts: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)


class _Rows:
    """The row partition both directions share, and the chunk currently being written."""

    def __init__(self, weight: Tensor, acc: torch.dtype):
        d_out, d_in = weight.shape
        step = chunk_rows(d_out, d_in, weight.device, acc.itemsize)
        self.d_out, self.d_in, self.step = d_out, d_in, step
        self.starts = list(range(0, d_out, step))
        self.done = 0  # rows [0, done) are written
        self.inflight: tuple[int, Tensor] | None = None  # (start, values) of the chunk being written

    def written(self, weight: Tensor) -> int:
        """Rows written so far, including the chunk in flight if its write went through."""
        if self.inflight is not None:
            start, values = self.inflight
            if start == self.done and _same_bits(weight[start : start + values.shape[0]], values):
                return start + values.shape[0]
        return self.done


def _check_dtype(weight: Tensor) -> None:
    if weight.dtype not in _BITS:
        raise TypeError(f"exact updates support float32/float64/bfloat16/float16, not {weight.dtype}")


def _via_contiguous(weight: Tensor, body) -> Any:
    """Run ``body`` on a contiguous copy of ``weight``, then write it back in one copy: the weight
    itself is changed in one operation, or not at all."""
    work = weight.contiguous()
    out = body(work)
    weight.copy_(work)
    return out


@torch.no_grad()
def apply_update(
    weight: Tensor, B: Tensor, A: Tensor, g: Tensor | None = None, *, interruptible: bool = True
) -> Residual:
    """``weight ← cast(g ⊙_row weight + B·A)`` in place; returns what :func:`revert_update`
    needs to restore ``weight`` bit for bit. ``weight`` is ``d_out × d_in``; ``B`` is
    ``d_out × k``, ``A`` is ``k × d_in``, ``g`` (optional) has length ``d_out``.

    All or nothing: if anything is raised (a ``KeyboardInterrupt`` between two chunks
    included), the rows already written are reverted exactly before it propagates."""
    _check_dtype(weight)
    if not weight.is_contiguous():
        work = weight.contiguous()
        res = apply_update(work, B, A, g, interruptible=interruptible)
        try:
            weight.copy_(work)
            return res
        except BaseException:
            revert_update(work, B, A, g, res, interruptible=False)
            weight.copy_(work)
            raise
    dtype = weight.dtype
    acc = acc_dtype(dtype)
    d_out, d_in = weight.shape
    device = weight.device
    B, A, g = _factors(B, A, g, acc, device)
    ibits = _BITS[dtype]
    numel = weight.numel()
    dense = torch.empty(numel, dtype=torch.int8, device=device)
    itype = torch.int32 if numel < 2**31 else torch.int64
    wide: list[tuple[Tensor, Tensor]] = []  # (flat positions, original bits) per chunk
    part = _Rows(weight, acc)
    step = part.step
    buf = _Work(min(step, d_out), d_in, dtype, acc, device)
    total = 0
    try:
        for start in part.starts:
            if interruptible:
                _interrupt.checkpoint()
            stop = min(d_out, start + step)
            rows = stop - start
            w = weight[start:stop]
            gc = g[start:stop] if g is not None else None
            d, m, m_lp, b_lp = buf.take(rows)
            torch.mm(B[start:stop], A, out=d)
            merged = _merged_rows(w, d, gc, m, m_lp)
            back = _undo_into(merged, d, gc, b_lp)
            # bits(original) - bits(undo), wrapping in the native integer width; restoring adds it
            # back with the same wrap, so the round trip is exact even across sign changes.
            diff = back.view(ibits)
            torch.sub(w.view(ibits), diff, out=diff)
            lo_bits, hi_bits = torch.aminmax(diff)
            # entries outside int8 wrap here; their positions are overwritten on revert anyway
            dense[start * d_in : stop * d_in].view(rows, d_in).copy_(diff)
            lo, hi = int(lo_bits), int(hi_bits)
            if lo < -128 or hi > 127:  # originals lost in W' (|W| ≪ |ΔW|)
                idx = _out_of_int8(diff, lo, hi)
                wide.append(((idx + start * d_in).to(itype), w.view(ibits).reshape(-1)[idx].clone()))
            total += _bits_sum(merged)
            part.inflight = (start, merged)
            w.copy_(merged)
            part.done = stop
            part.inflight = None
        if interruptible:
            _interrupt.checkpoint()
        res = Residual(
            numel=numel,
            dense=dense,
            index=None,
            values=None,
            wide_index=_cat([i for i, _ in wide], itype, device),
            wide_bits=_cat([b for _, b in wide], ibits, device),
            merged_sum=total & _MASK,
        )
        if _sparse_pays(dense, itype.itemsize + 1):
            nz = _nonzero_int8(dense)
            if nz.numel() * (itype.itemsize + 1) < numel:  # the sample can mislead; the size cannot
                res = dataclasses.replace(res, dense=None, index=nz.to(itype), values=dense[nz])
        return res
    except BaseException:
        written = part.written(weight)
        if written:
            limit = written * d_in
            wi = _cat([i for i, _ in wide], itype, device)
            wb = _cat([b for _, b in wide], ibits, device)
            keep = wi < limit
            partial = Residual(numel, dense, None, None, wi[keep], wb[keep], 0)
            _revert(weight, B, A, g, partial, rows=written, interruptible=False)
        raise


@torch.no_grad()
def revert_update(
    weight: Tensor,
    B: Tensor,
    A: Tensor,
    g: Tensor | None,
    residual: Residual | None,
    *,
    interruptible: bool = True,
) -> None:
    """Undo :func:`apply_update` in place. With ``residual`` the original bits come back exactly;
    with ``None`` the undo is plain arithmetic (within rounding).

    All or nothing: if anything is raised between two chunks, the rows already reverted are
    brought back to their merged bits (recomputed exactly from the restored originals) before it
    propagates. An arithmetic undo (``residual=None``) is not exactly re-doable, so it is made on
    a copy and written back in one operation."""
    _check_dtype(weight)
    if residual is None or not weight.is_contiguous():
        _via_contiguous(weight, lambda work: _revert(work, B, A, g, residual, interruptible=interruptible))
        return
    _revert(weight, B, A, g, residual, interruptible=interruptible)


def _revert(
    weight: Tensor,
    B: Tensor,
    A: Tensor,
    g: Tensor | None,
    residual: Residual | None,
    rows: int | None = None,
    interruptible: bool = True,
) -> None:
    """Revert rows ``[0, rows)`` (all by default) of a contiguous weight, chunk by chunk; on an
    exception the reverted rows are re-applied exactly (``residual`` given) before re-raising."""
    dtype = weight.dtype
    acc = acc_dtype(dtype)
    d_out, d_in = weight.shape
    device = weight.device
    B, A, g = _factors(B, A, g, acc, device)
    ibits = _BITS[dtype]
    part = _Rows(weight, acc)
    step = part.step
    limit = d_out if rows is None else rows
    starts = [s for s in part.starts if s < limit]
    dense = residual.dense if residual is not None else None
    sp_at = _bounds(residual.index, d_in, starts) if residual is not None else None
    wide_at = _bounds(residual.wide_index, d_in, starts) if residual is not None else None
    buf = _Work(min(step, d_out), d_in, dtype, acc, device)
    try:
        for i, start in enumerate(starts):
            if interruptible:
                _interrupt.checkpoint()
            stop = min(limit, start + step)
            n = stop - start
            w = weight[start:stop]
            d, _, _, b_lp = buf.take(n)
            torch.mm(B[start:stop], A, out=d)
            back = _undo_into(w, d, g[start:stop] if g is not None else None, b_lp)
            if residual is not None:
                bits = back.view(ibits)
                flat = bits.view(-1)
                off = start * d_in
                if dense is not None:
                    bits.add_(dense[off : stop * d_in].view(n, d_in))
                if sp_at is not None and sp_at[i + 1] > sp_at[i]:
                    idx = residual.index[sp_at[i] : sp_at[i + 1]].long() - off
                    flat.index_add_(0, idx, residual.values[sp_at[i] : sp_at[i + 1]].to(ibits))
                if wide_at is not None and wide_at[i + 1] > wide_at[i]:
                    idx = residual.wide_index[wide_at[i] : wide_at[i + 1]].long() - off
                    flat[idx] = residual.wide_bits[wide_at[i] : wide_at[i + 1]]
            part.inflight = (start, back)
            w.copy_(back)
            part.done = stop
            part.inflight = None
        if interruptible:
            _interrupt.checkpoint()
    except BaseException:
        written = part.written(weight)
        if written and residual is not None:
            _reapply(weight, B, A, g, written)
        raise


def _merged_rows(w: Tensor, d: Tensor, gc: Tensor | None, m: Tensor, m_lp: Tensor | None) -> Tensor:
    """``cast(gc ⊙_row w + d)`` for rows ``w`` with their update ``d = B·A`` (accumulation dtype),
    into the work buffers ``m`` / ``m_lp`` (the weight's dtype when it is low precision). Computed
    in the accumulation dtype (a low-precision ``w`` is widened exactly inside the add) and
    rounded once on the write."""
    if gc is None:
        return torch.add(w, d, out=m if m_lp is None else m_lp)
    m.copy_(w)
    torch.addcmul(d, m, gc, out=m)
    return m if m_lp is None else m_lp.copy_(m)


def _reapply(weight: Tensor, B: Tensor, A: Tensor, g: Tensor | None, rows: int) -> None:
    """Write ``cast(g ⊙_row W + B·A)`` again over rows ``[0, rows)`` that a revert restored to
    their original bits: the same operations on the same inputs give the merged bits back."""
    dtype = weight.dtype
    acc = acc_dtype(dtype)
    d_in = weight.shape[1]
    part = _Rows(weight, acc)
    buf = _Work(min(part.step, part.d_out), d_in, dtype, acc, weight.device)
    for start in part.starts:
        if start >= rows:
            break
        stop = min(rows, start + part.step)
        w = weight[start:stop]
        gc = g[start:stop] if g is not None else None
        d, m, m_lp, _ = buf.take(stop - start)
        torch.mm(B[start:stop], A, out=d)
        w.copy_(_merged_rows(w, d, gc, m, m_lp))


def version(t: Tensor) -> int | None:
    """``t``'s version counter, or None for an inference tensor (which has none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def fingerprint(*tensors: Tensor | None) -> tuple:
    """A cheap identity of tensors' contents: storage, version counter, shape, dtype.

    Any in-place change (an optimizer step, ``copy_``, a load) bumps the version counter. A match
    proves nothing changed only when every version is known (:func:`same_print`); a mismatch
    proves nothing either way (a copy has a new address and a fresh counter).
    """
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        local = local_view(t)  # a sharded tensor (FSDP2): this process's shard
        out.append((local.data_ptr(), version(local), tuple(t.shape), local.stride(), t.dtype, t.device))
    return tuple(out)


def same_print(a: tuple, b: tuple) -> bool:
    """True when two fingerprints match and carry known versions."""
    return a == b and all(x is None or x[1] is not None for x in a)
