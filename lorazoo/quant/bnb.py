"""bitsandbytes interop: its NF4 ``Linear4bit`` layers to lorazoo's NF4 storage and back, byte
for byte (nothing is requantised: the packed codes and the quantisation state are mapped
field by field).

bitsandbytes is optional (``pip install lorazoo[qlora]``); it is imported only when one of
these functions is called. Accepted: ``quant_type="nf4"``, block size 64, with or without
double quantisation (``compress_statistics``, second-level groups of 256), the code books
lorazoo uses (checked value for value). Anything else is refused with the field that differs.

Field mapping (bitsandbytes → :class:`~lorazoo.quant.NF4Weight`):

* packed weight ``uint8[⌈n/2⌉, 1]`` (or another ``quant_storage`` dtype over the same bytes) →
  ``codes`` (flat);
* ``quant_state.absmax`` → ``absmax``;
* ``quant_state.state2.absmax`` → ``absmax_scale``; ``quant_state.offset`` → ``absmax_offset``
  (double quantisation);
* ``quant_state.shape`` / ``dtype`` → ``shape`` / ``dtype``.

The layer is read through its ``state_dict()``: on CPUs with AVX512-BF16, bitsandbytes' eval
forward repacks ``weight.data`` into another layout in place, and its state-dict writer puts the
standard layout back first, so the state dict (not the raw storage) is the reference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .linear import NF4Linear
from .nf4 import BLOCK, SCALE_GROUP, NF4Weight, dynamic_code, nf4_code


def _import_bnb() -> Any:
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "bitsandbytes is not installed; install it (pip install 'lorazoo[qlora]') to convert "
            f"Linear4bit layers ({exc})"
        ) from exc
    return bitsandbytes


def is_linear4bit(module: nn.Module) -> bool:
    """True for a ``bitsandbytes.nn.Linear4bit`` (without importing bitsandbytes when it is not
    already imported: a model cannot hold one otherwise)."""
    import sys

    bnb = sys.modules.get("bitsandbytes.nn")
    return bnb is not None and isinstance(module, bnb.Linear4bit)


def _quant_state(layer: nn.Module) -> tuple[Tensor, Any]:
    """The packed tensor and ``QuantState`` of ``layer``, in the standard layout."""
    bnb = _import_bnb()
    if not isinstance(layer, bnb.nn.Linear4bit):
        raise ConfigError(f"expected a bitsandbytes.nn.Linear4bit, got {type(layer).__name__}")
    if getattr(layer.weight, "quant_state", None) is None:
        raise ConfigError(
            "this Linear4bit is not quantised yet (bitsandbytes quantises on the first move to a "
            "device: call layer.to('cpu') or load it quantised)"
        )
    sd = layer.state_dict()  # bitsandbytes undoes its CPU repacking here
    packed = sd["weight"]
    stats = {k[len("weight.") :]: v for k, v in sd.items() if k.startswith("weight.")}
    qs = bnb.functional.QuantState.from_dict(stats, device=packed.device)
    return packed, qs


def _check_state(qs: Any) -> None:
    if qs.quant_type != "nf4":
        raise ConfigError(f"quant_type is {qs.quant_type!r}; lorazoo's NF4 storage takes 'nf4' only")
    if qs.blocksize != BLOCK:
        raise ConfigError(f"blocksize is {qs.blocksize}; lorazoo's NF4 storage uses {BLOCK}")
    if not torch.equal(qs.code.float().cpu(), nf4_code()):
        raise ConfigError("the layer's quant_map is not the NF4 code book lorazoo uses")
    if qs.state2 is not None:
        if qs.state2.blocksize != SCALE_GROUP:
            raise ConfigError(
                f"nested_blocksize is {qs.state2.blocksize}; lorazoo's double quantisation groups "
                f"{SCALE_GROUP} scales"
            )
        if not torch.equal(qs.state2.code.float().cpu(), dynamic_code()):
            raise ConfigError("the layer's nested_quant_map is not the dynamic code book lorazoo uses")
        if qs.absmax.dtype != torch.uint8:
            raise ConfigError(f"double-quantised absmax must be uint8, got {qs.absmax.dtype}")
    elif qs.absmax.dtype != torch.float32:
        raise ConfigError(f"absmax must be float32, got {qs.absmax.dtype}")


def nf4_from_bnb(layer: nn.Module) -> NF4Weight:
    """The weight of a bitsandbytes ``Linear4bit`` (NF4, block 64) as an :class:`NF4Weight`,
    byte for byte (copies; ``layer`` is not modified, except that bitsandbytes itself undoes
    its CPU repacking when its state dict is read)."""
    packed, qs = _quant_state(layer)
    _check_state(qs)
    codes = packed.detach().reshape(-1).contiguous()
    if codes.dtype != torch.uint8:  # another quant_storage dtype over the same bytes
        codes = codes.view(torch.uint8)
    shape = torch.Size(qs.shape)
    n = shape.numel()
    if codes.numel() != -(-n // 2):
        raise ConfigError(
            f"the packed weight has {codes.numel()} bytes; a {tuple(shape)} weight needs {-(-n // 2)}"
        )
    if qs.state2 is None:
        return NF4Weight(codes.clone(), qs.absmax.detach().clone(), None, None, shape, qs.dtype)
    return NF4Weight(
        codes.clone(),
        qs.absmax.detach().clone(),
        qs.state2.absmax.detach().float().clone(),
        qs.offset.detach().float().reshape(()).clone(),
        shape,
        qs.dtype,
    )


def nf4linear_from_bnb(layer: nn.Module) -> NF4Linear:
    """An :class:`NF4Linear` holding ``layer``'s packed weight byte for byte and a frozen copy of
    its bias."""
    return NF4Linear.from_nf4(nf4_from_bnb(layer), layer.bias)


def quant_state_of(q: NF4Weight) -> Any:
    """A bitsandbytes ``QuantState`` describing ``q`` (sharing its tensors)."""
    bnb = _import_bnb()
    QuantState = bnb.functional.QuantState
    device = q.codes.device
    state2 = None
    offset = None
    if q.double_quant:
        state2 = QuantState(
            absmax=q.absmax_scale, code=dynamic_code(device), blocksize=SCALE_GROUP, dtype=torch.float32
        )
        offset = q.absmax_offset
    return QuantState(
        absmax=q.absmax,
        shape=torch.Size(q.shape),
        code=nf4_code(device),
        blocksize=BLOCK,
        quant_type="nf4",
        dtype=q.dtype,
        offset=offset,
        state2=state2,
    )


def to_bnb(
    q: NF4Weight | NF4Linear, bias: Tensor | None = None, compute_dtype: torch.dtype | None = None
) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``q``'s bytes (copies). Given an
    :class:`NF4Linear`, its bias is used (``bias`` must then be None); it must not hold a dense
    weight (export or unmerge it first)."""
    bnb = _import_bnb()
    if isinstance(q, NF4Linear):
        if q.holds_dense:
            raise ConfigError(
                "this NF4Linear holds a dense (merged) weight; its packed bytes are not what it "
                "computes with: drop_dense() it, or export_nf4() to requantise it first"
            )
        if bias is not None:
            raise ConfigError("to_bnb(NF4Linear) uses the layer's own bias; pass bias=None")
        bias = q.bias
        q = q.nf4()
    if len(q.shape) != 2:
        raise ConfigError(f"a Linear4bit weight is 2-D (out x in), got shape {tuple(q.shape)}")
    out_f, in_f = q.shape
    device = q.codes.device
    layer = bnb.nn.Linear4bit(
        in_f,
        out_f,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=q.double_quant,
        quant_type="nf4",
        device="meta",
    )
    copied = NF4Weight(
        q.codes.clone(),
        q.absmax.clone(),
        None if q.absmax_scale is None else q.absmax_scale.clone(),
        None if q.absmax_offset is None else q.absmax_offset.clone(),
        q.shape,
        q.dtype,
    )
    layer.weight = bnb.nn.Params4bit(
        copied.codes.reshape(-1, 1),
        requires_grad=False,
        quant_state=quant_state_of(copied),
        blocksize=BLOCK,
        compress_statistics=q.double_quant,
        quant_type="nf4",
        bnb_quantized=True,
        module=layer,
    )
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(device).clone(), requires_grad=False)
    return layer
