"""NF4 storage in plain PyTorch: 4-bit NormalFloat codes, block size 64, absmax scales, and
optional double quantisation of those scales.

Layout of one quantised tensor of ``n`` elements (see :class:`NF4Weight`):

* ``codes``: ``uint8[ceil(n / 2)]``. The tensor is flattened in row-major order and cut into
  blocks of 64 consecutive elements (the last block may be shorter). Each element is divided by
  its block's absolute maximum and rounded to the nearest of the 16 NF4 values; the 4-bit index
  of the first element of a pair is the high nibble, the second the low nibble. An odd count is
  padded with the code of 0.
* without double quantisation, ``absmax``: ``float32[ceil(n / 64)]``, the block scales.
* with double quantisation, ``absmax``: ``uint8[ceil(n / 64)]``, the scales minus their mean,
  each quantised to the nearest value of a signed 8-bit dynamic code book in groups of 256
  scales; ``absmax_scale``: ``float32[ceil(n / 16384)]``, the absolute maximum of each group;
  ``absmax_offset``: ``float32[]``, the mean that was subtracted.

The arithmetic (and therefore every stored byte) is the one bitsandbytes uses for
``quantize_4bit(..., quant_type="nf4", blocksize=64, compress_statistics=...)``; the tests check
both byte for byte when bitsandbytes is installed. Dequantisation computes ``code · scale`` in
float32 and rounds once to the output dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError

BLOCK = 64
"""Elements per absmax block."""
SCALE_GROUP = 256
"""Block scales per second-level group under double quantisation."""

# The 16 NF4 values: quantiles of N(0, 1) rescaled to [-1, 1] with an exact zero, as float32
# (the reference values bitsandbytes ships).
NF4_VALUES: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_ZERO_CODE = 7

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _dynamic_code() -> Tensor:
    """The signed 8-bit dynamic code book (256 sorted float32 values in [-1, 1]) used for the
    block scales: 7 decades ``10^-6 … 10^0``, decade ``i`` holding ``2^i`` evenly spaced values
    per sign (midpoints of ``linspace(0.1, 1, 2^i + 1)``), plus 0 and 1. The range is
    ``[-0.993, 1]``: a scale at the negative end of its group is stored as -0.993 of the group's
    absolute maximum."""
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += (10 ** (i - 6) * mids).tolist()
        values += (-(10 ** (i - 6)) * mids).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


_TABLES: dict[tuple[str, torch.device], Tensor] = {}


def _table(name: str, device: torch.device) -> Tensor:
    key = (name, device)
    t = _TABLES.get(key)
    if t is None:
        if name == "nf4":
            t = torch.tensor(NF4_VALUES, dtype=torch.float32)
        elif name == "nf4_bounds":
            c = torch.tensor(NF4_VALUES, dtype=torch.float32)
            t = (c[:-1] + c[1:]) / 2
        elif name == "nf4_pairs":  # byte -> (value of the high nibble, value of the low nibble)
            c = torch.tensor(NF4_VALUES, dtype=torch.float32)
            b = torch.arange(256)
            t = torch.stack([c[b >> 4], c[b & 15]], dim=1).contiguous()
        elif name == "dynamic":
            t = _dynamic_code()
        elif name == "dynamic_lut":  # 65536 evenly spaced points of [-1, 1] -> nearest dynamic code
            c = _dynamic_code()
            mids = 0.5 * (c[:-1] + c[1:])
            points = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
            t = torch.searchsorted(mids, points).to(torch.uint8)
        else:  # pragma: no cover - internal names only
            raise KeyError(name)
        t = t.to(device)
        _TABLES[key] = t
    return t


def nf4_code(device: torch.device | str = "cpu") -> Tensor:
    """The 16 NF4 values as a float32 tensor (index = 4-bit code)."""
    return _table("nf4", torch.device(device)).clone()


def dynamic_code(device: torch.device | str = "cpu") -> Tensor:
    """The 256-entry signed dynamic code book of the double-quantised scales (index = byte)."""
    return _table("dynamic", torch.device(device)).clone()


@dataclass(frozen=True)
class NF4Weight:
    """One tensor in NF4 storage (see the module docstring for the layout)."""

    codes: Tensor
    absmax: Tensor
    absmax_scale: Tensor | None
    absmax_offset: Tensor | None
    shape: torch.Size
    dtype: torch.dtype

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def tensors(self) -> dict[str, Tensor]:
        """Every stored tensor by name (what :meth:`storage_bytes` counts)."""
        out = {"codes": self.codes, "absmax": self.absmax}
        if self.absmax_scale is not None and self.absmax_offset is not None:
            out["absmax_scale"] = self.absmax_scale
            out["absmax_offset"] = self.absmax_offset
        return out

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_param(self) -> float:
        return 8 * self.storage_bytes() / max(1, self.numel)


def storage_sizes(numel: int, double_quant: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each stored tensor for ``numel`` elements."""
    blocks = -(-numel // BLOCK)
    sizes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"codes": ((-(-numel // 2),), torch.uint8)}
    if double_quant:
        sizes["absmax"] = ((blocks,), torch.uint8)
        sizes["absmax_scale"] = ((-(-blocks // SCALE_GROUP),), torch.float32)
        sizes["absmax_offset"] = ((), torch.float32)
    else:
        sizes["absmax"] = ((blocks,), torch.float32)
    return sizes


def bits_per_param(numel: int, double_quant: bool = True) -> float:
    """Stored bits per element for a tensor of ``numel`` elements (every stored tensor counted)."""
    total = 0
    for shape, dtype in storage_sizes(numel, double_quant).values():
        total += math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return 8 * total / max(1, numel)


# ---- quantisation -----------------------------------------------------------------------------

_CHUNK_BLOCKS = 4096  # blocks per chunk (256 Ki elements): stays in cache, bounds temporaries


def _quantize_blocks(x: Tensor, recip: bool, codes_out: Tensor, bounds: Tensor) -> Tensor:
    """Quantise full blocks ``x`` (``[k, 64]`` or one short row, float32) into ``codes_out``
    (``uint8[numel / 2]``); return the block absmax. ``recip``: scale by the reciprocal (full
    blocks) or divide (the trailing short block), as the reference does."""
    if recip:
        absmax = x.abs().amax(dim=-1)
        scaled = x * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(-1)
    else:
        absmax = x.abs().amax().clamp(min=1e-38).reshape(1)
        scaled = x / absmax
    scaled = scaled.clamp_(-1, 1).reshape(-1)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8).view(-1, 2)
    torch.bitwise_or(q[:, 0] << 4, q[:, 1], out=codes_out)
    return absmax


def _quantize_absmax(absmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Double quantisation of the block scales: ``(uint8 codes, float32 group absmax, offset)``."""
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    groups = -(-n // SCALE_GROUP)
    pad = groups * SCALE_GROUP - n
    padded = torch.nn.functional.pad(centred, (0, pad)) if pad else centred
    g = padded.view(groups, SCALE_GROUP)
    gmax = g.abs().amax(dim=-1)  # zero padding never raises a maximum of absolute values
    inv = 1.0 / gmax
    normed = (g * inv.unsqueeze(-1)).clamp_(-1, 1).reshape(-1)[:n]
    # Nearest code value through a 65536-entry table over [-1, 1] (the reference's method, kept for
    # byte equality: a value within half a table step of a midpoint may round to either side).
    pos = ((normed + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int32).clamp_(0, 65535)
    idx = _table("dynamic_lut", absmax.device)[pos]
    zero_group = (gmax == 0).repeat_interleave(SCALE_GROUP)[:n]
    idx = torch.where(zero_group, torch.zeros_like(idx), idx)
    return idx.to(torch.uint8), gmax, offset


@torch.no_grad()
def quantize_nf4(weight: Tensor, double_quant: bool = True) -> NF4Weight:
    """Quantise ``weight`` (float32, bfloat16, float16 or float64; any shape) to NF4 storage.
    The arithmetic is float32's (a float64 weight is rounded to float32 first).

    Work is done in chunks of 4096 blocks, so temporaries stay bounded whatever the size.
    """
    if weight.dtype not in _FLOAT_DTYPES:
        raise ConfigError(
            f"NF4 quantisation takes a float32, bfloat16, float16 or float64 tensor, got {weight.dtype}; "
            "cast it first (e.g. weight.float())"
        )
    if weight.device.type == "meta":
        raise ConfigError("cannot quantise a tensor on the meta device; materialise the weights first")
    if weight.numel() == 0:
        raise ConfigError(f"cannot quantise an empty tensor (shape {tuple(weight.shape)})")
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    full = n // BLOCK
    rem = n - full * BLOCK
    device = weight.device
    bounds = _table("nf4_bounds", device)
    codes = torch.empty(-(-n // 2), dtype=torch.uint8, device=device)
    absmax = torch.empty(full + (1 if rem else 0), dtype=torch.float32, device=device)
    half = BLOCK // 2
    for b0 in range(0, full, _CHUNK_BLOCKS):
        b1 = min(full, b0 + _CHUNK_BLOCKS)
        x = flat[b0 * BLOCK : b1 * BLOCK].float().view(b1 - b0, BLOCK)
        absmax[b0:b1] = _quantize_blocks(x, True, codes[b0 * half : b1 * half], bounds)
    if rem:
        x = flat[full * BLOCK :].float()
        absmax[full:] = _quantize_blocks(x, False, codes[full * half :], bounds)
    if not double_quant:
        return NF4Weight(codes, absmax, None, None, weight.shape, weight.dtype)
    qabs, gmax, offset = _quantize_absmax(absmax)
    return NF4Weight(codes, qabs, gmax, offset, weight.shape, weight.dtype)


# ---- dequantisation ---------------------------------------------------------------------------


def block_scales(q: NF4Weight) -> Tensor:
    """The float32 absmax of every block, as dequantisation uses it."""
    if q.absmax_scale is None or q.absmax_offset is None:
        return q.absmax
    code = _table("dynamic", q.absmax.device)
    n = q.absmax.numel()
    group = q.absmax_scale.repeat_interleave(SCALE_GROUP)[:n]
    return code[q.absmax.long()] * group + q.absmax_offset


@torch.no_grad()
def dequantize_nf4(
    q: NF4Weight, dtype: torch.dtype | None = None, out: Tensor | None = None, chunk_blocks: int = 4096
) -> Tensor:
    """The tensor ``q`` stands for, in ``dtype`` (default: the dtype it was quantised from).

    Each element is ``NF4[code] · scale`` computed in float32 and rounded once to ``dtype``. The
    result is built ``chunk_blocks`` blocks at a time into ``out`` (allocated when not given), so
    float32 temporaries stay bounded.
    """
    dtype = dtype or q.dtype
    if dtype not in _FLOAT_DTYPES:
        raise ConfigError(f"NF4 dequantises to float32, bfloat16, float16 or float64, not {dtype}")
    device = q.codes.device
    n = q.numel
    if device.type == "meta":  # a stand-in without data (a load's dry run): only the shape
        return torch.empty(q.shape, dtype=dtype, device=device) if out is None else out
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=device)
    elif out.shape != q.shape or out.dtype != dtype or not out.is_contiguous():
        raise ConfigError(
            f"out must be a contiguous {dtype} tensor of shape {tuple(q.shape)}, "
            f"got {out.dtype} {tuple(out.shape)}"
        )
    pairs = _table("nf4_pairs", device)
    scales = block_scales(q)
    flat = out.view(-1)
    full = n // BLOCK
    half = BLOCK // 2
    step = max(1, min(chunk_blocks, full))
    # float32 output: look up straight into it; otherwise through one reused float32 chunk
    scratch = None if dtype == torch.float32 else torch.empty(step * BLOCK, device=device)
    for b0 in range(0, full, step):
        b1 = min(full, b0 + step)
        k = b1 - b0
        dst = flat[b0 * BLOCK : b1 * BLOCK]
        buf = dst if scratch is None else scratch[: k * BLOCK]
        torch.index_select(pairs, 0, q.codes[b0 * half : b1 * half].int(), out=buf.view(k * half, 2))
        buf.view(k, BLOCK).mul_(scales[b0:b1].unsqueeze(-1))
        if scratch is not None:
            dst.copy_(buf)
    if n > full * BLOCK:
        vals = pairs.index_select(0, q.codes[full * half :].int()).view(-1)[: n - full * BLOCK]
        flat[full * BLOCK :].copy_(vals.mul_(scales[full]))
    return out


# ---- error measurement ------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantError:
    """How far a dequantised tensor is from the tensor that was quantised (computed in float64)."""

    relative: float
    """``‖W − dequant(Q(W))‖_F / ‖W‖_F`` (0 for an all-zero W)."""
    max_abs: float
    """``max |W − dequant(Q(W))|``."""
    numel: int
    bits_per_param: float

    def __str__(self) -> str:
        return (
            f"relative error {self.relative:.4g}, max |error| {self.max_abs:.4g} over {self.numel} "
            f"elements at {self.bits_per_param:.3f} bits/param"
        )


def quant_error(reference: Tensor, q: NF4Weight) -> QuantError:
    """Compare ``reference`` with ``dequantize_nf4(q)`` (in float64, chunk by chunk of rows)."""
    if tuple(reference.shape) != tuple(q.shape):
        raise ConfigError(f"shapes differ: reference {tuple(reference.shape)} vs quantised {tuple(q.shape)}")
    deq = dequantize_nf4(q, torch.float32).reshape(-1)
    ref = reference.detach().reshape(-1)
    num = 0.0
    den = 0.0
    mx = 0.0
    step = 1 << 20
    for i in range(0, ref.numel(), step):
        r = ref[i : i + step].double()
        d = deq[i : i + step].double() - r
        num += float(d.square().sum())
        den += float(r.square().sum())
        mx = max(mx, float(d.abs().max()))
    rel = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
    return QuantError(rel, mx, ref.numel(), q.bits_per_param())


def requantize(weight: Tensor, double_quant: bool = True) -> tuple[NF4Weight, QuantError]:
    """Quantise ``weight`` to NF4 and report the error this rounding makes (the explicit export
    step for a dense weight, e.g. a merged one: NF4 cannot hold ``dequant(Q) + ΔW`` exactly)."""
    q = quantize_nf4(weight, double_quant)
    return q, quant_error(weight, q)
