"""Quantised base weights: NF4 storage (4-bit NormalFloat, block 64, optional double
quantisation of the block scales) in plain PyTorch, a frozen :class:`NF4Linear` layer, and
whole-model :func:`quantize` / :func:`dequantize`.

    report = lorazoo.quantize(model)          # every nn.Linear but the output head -> NF4Linear
    lorazoo.dequantize(model)                 # back to dense nn.Linear (dequantised weights)

An ``NF4Linear`` can hold a dense (merged) weight in place of its packed storage and drop it
again with the packed bytes unchanged (``hold_dense`` / ``drop_dense``); ``export_nf4``
requantises explicitly and reports the error. ``lorazoo.quant.bnb`` converts bitsandbytes'
``Linear4bit`` layers to and from this storage byte for byte (bitsandbytes is optional).
"""

from .linear import NF4Linear
from .model import QuantReport, dequantize, quantize
from .nf4 import (
    BLOCK,
    NF4_VALUES,
    SCALE_GROUP,
    NF4Weight,
    QuantError,
    bits_per_param,
    block_scales,
    dequantize_nf4,
    dynamic_code,
    nf4_code,
    quant_error,
    quantize_nf4,
    requantize,
    storage_sizes,
)

__all__ = [
    "BLOCK",
    "NF4Linear",
    "NF4Weight",
    "NF4_VALUES",
    "QuantError",
    "QuantReport",
    "SCALE_GROUP",
    "bits_per_param",
    "block_scales",
    "dequantize",
    "dequantize_nf4",
    "dynamic_code",
    "nf4_code",
    "quant_error",
    "quantize",
    "quantize_nf4",
    "requantize",
    "storage_sizes",
]
