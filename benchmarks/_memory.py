"""Memory figures for the performance scripts: the peak a callable reaches, and what autograd keeps.

``peak_bytes(fn)`` is the highest memory in use while ``fn()`` runs, above what was in use when it
started. On CUDA it is the caching allocator's own counter. On CPU PyTorch keeps no such counter,
so we read the kernel's: the process's resident-set high-water mark (``VmHWM``), reset before the
call through ``/proc/self/clear_refs``. For that figure to follow tensor memory, glibc must return
freed tensors to the kernel instead of keeping them in its heap, so the first call pins malloc's
mmap threshold at 64 KiB (larger allocations are then mapped and unmapped one by one; glibc would
otherwise raise the threshold as tensors are freed). What remains is page granularity and small
Python objects, a few hundred KiB, well below the figures compared here.

``saved_bytes(fn)`` counts the bytes autograd saves for backward during ``fn()`` (distinct
storages, parameters excluded): the activation memory a training step holds at its peak. It is
exact and deterministic, so it shows a difference that the peak measures only with noise.

Where ``/proc`` is unavailable (not Linux), ``peak_bytes`` returns ``None`` on CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from lorazoo.bench.measure import PeakMemory

_M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)
_pinned = False


def _pin_malloc() -> None:
    global _pinned
    if _pinned:
        return
    _pinned = True
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16)
    except (OSError, AttributeError):  # not glibc: its allocator already unmaps or we cannot ask
        pass


def peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int | None:
    """Peak memory in use during ``fn()`` above the level at its start, in bytes.

    The measurement is ``lorazoo bench``'s (:class:`lorazoo.bench.measure.PeakMemory`); on CPU
    the malloc pin above is added, which makes the figure follow tensor memory closely at the
    price of slower allocations (so time in another process than the one that measures).
    """
    dev = torch.device(device)
    if dev.type == "cpu":
        _pin_malloc()
    with PeakMemory(dev) as peak:
        fn()
    return peak.bytes


def saved_bytes(fn: Callable[[], object], exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of distinct storages autograd saves for backward while ``fn()`` runs.

    ``exclude`` (typically ``model.parameters()``) names tensors that exist anyway and are not
    counted; parameters are leaves, and saving them costs nothing extra.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in skip:
                seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def mib(n: int | None) -> str:
    """``n`` bytes as MiB for tables (``n/a`` when unmeasured)."""
    return "n/a" if n is None else f"{n / 2**20:.1f}"
