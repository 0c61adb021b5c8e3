"""Measurement helpers for ``lorazoo bench``: peak memory, paired latency, progress display.

Peak memory on CPU is the process's resident-set high-water mark (``VmHWM`` in
``/proc/self/status``), reset to the current resident size before each run by writing ``5`` to
``/proc/self/clear_refs``; the figure reported is the high-water mark minus the resident size at
the start of the run, i.e. what the run added at its peak, measured in the bench's own process.
For the resident size to follow tensor memory, the pages an earlier run freed must not be
reused silently (a later run would then read close to zero), so :func:`trim_malloc` hands the C
heap's free pages back to the kernel just before the reset (glibc ``malloc_trim(0)``): the run
must fault in every page it uses, and large blocks, which glibc maps on their own, are unmapped
on free anyway. This costs one call per run; pinning malloc's mmap threshold instead would make
every allocation a system call and doubled the bench's CPU time in a trial. Where ``/proc`` is
not writable the peak is reported as ``None``. On CUDA it is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the allocation at
the start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def trim_malloc() -> bool:
    """Return the C heap's free pages to the kernel (glibc ``malloc_trim(0)``), so the resident
    size drops to what is live. Returns False where the C library has no such call."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


class PeakMemory:
    """Context manager: ``.bytes`` is the peak memory the block added (``None`` if unmeasurable)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: int | None = None
        self.method = ""

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated minus the allocation at start"
            return self
        self._start = None
        trim_malloc()  # freed heap pages go back to the kernel: the run must fault in its own
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.method = "unavailable (/proc/self/clear_refs not writable)"
            return self
        self._start = _status_kib("VmRSS")
        self.method = (
            "VmHWM after malloc_trim(0) and /proc/self/clear_refs=5, minus VmRSS at start (in process)"
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        if self._start is None:
            return
        hwm = _status_kib("VmHWM")
        if hwm is not None:
            self.bytes = max(0, hwm - self._start) * 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_ratio(
    first: Callable[[], object],
    second: Callable[[], object],
    switch_to_first: Callable[[], object],
    switch_to_second: Callable[[], object],
    device: torch.device,
    repeats: int = 9,
    inner: int = 2,
) -> dict[str, float]:
    """Median over interleaved pairs of ``time(first) / time(second)``.

    The two states cannot coexist (a model is merged or it is not), so each pair switches state
    between its halves; switching is not timed. The order within a pair alternates so neither
    side always runs second. Returns the median ratio, its interquartile spread and the median
    seconds per call of each side (wall time).
    """
    ratios: list[float] = []
    t_first: list[float] = []
    t_second: list[float] = []

    def timed(fn: Callable[[], object]) -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / inner

    switch_to_first()
    first()
    switch_to_second()
    second()  # warm-up of both paths
    for i in range(repeats):
        if i % 2 == 0:
            switch_to_first()
            a = timed(first)
            switch_to_second()
            b = timed(second)
        else:
            switch_to_second()
            b = timed(second)
            switch_to_first()
            a = timed(first)
        t_first.append(a)
        t_second.append(b)
        ratios.append(a / b)
    switch_to_first()
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "ratio": statistics.median(ratios),
        "q1": q[0],
        "q3": q[2],
        "first_s": statistics.median(t_first),
        "second_s": statistics.median(t_second),
        "pairs": len(ratios),
    }


class Progress:
    """One progress bar on stderr: tqdm when installed, else a plain line printer.

    The plain fallback rewrites one line (``\\r``) on a terminal and prints a line at most every
    ten percent otherwise, so logs stay short.
    """

    def __init__(self, total: int, stream: IO[str] | None = None, enabled: bool = True):
        self.total = max(1, total)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.desc = ""
        self._bar = None
        self._last = 0.0
        self._last_decile = -1
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        else:
            self._bar = tqdm(total=self.total, file=self.stream, unit="step", dynamic_ncols=True, leave=False)

    def describe(self, desc: str) -> None:
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc)
        elif self.enabled:
            self._print(force=True)

    def update(self, n: int = 1, note: str = "") -> None:
        self.done = min(self.total, self.done + n)
        self.note = note
        if self._bar is not None:
            self._bar.update(n)
            if note:
                self._bar.set_postfix_str(note, refresh=False)
        elif self.enabled:
            self._print()

    def _print(self, force: bool = False) -> None:
        pct = 100.0 * self.done / self.total
        note = getattr(self, "note", "")
        line = f"lorazoo bench {pct:5.1f}% {self.desc} {note}".rstrip()
        now = time.monotonic()
        if self._tty:
            if force or now - self._last > 0.5:
                self.stream.write("\r" + line[:100].ljust(100))
                self.stream.flush()
                self._last = now
        else:
            decile = int(pct // 10)
            if force or decile > self._last_decile:
                self._last_decile = decile
                self.stream.write(line + "\n")
                self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self._tty:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()
