"""bitsandbytes ``Linear4bit`` (NF4, block 64) to lorazoo's NF4 storage and back, byte for byte."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorazoo.errors import ConfigError
from lorazoo.quant import NF4Linear, dequantize_nf4, quantize_nf4
from lorazoo.quant.bnb import is_linear4bit, nf4_from_bnb, nf4linear_from_bnb, to_bnb

bnb = pytest.importorskip("bitsandbytes")
bnbF = pytest.importorskip("bitsandbytes.functional")


def _dense(d_in=96, d_out=70, dtype=torch.float32, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out).to(dtype)
    with torch.no_grad():
        lin.bias.normal_()
    return lin


def _linear4bit(lin: nn.Linear, dq: bool, quant_type="nf4", blocksize=64, storage=torch.uint8) -> nn.Module:
    layer = bnb.nn.Linear4bit(
        lin.in_features,
        lin.out_features,
        bias=lin.bias is not None,
        compute_dtype=lin.weight.dtype,
        compress_statistics=dq,
        quant_type=quant_type,
        quant_storage=storage,
    )
    layer.weight = bnb.nn.Params4bit(
        lin.weight.detach().clone(),
        requires_grad=False,
        compress_statistics=dq,
        quant_type=quant_type,
        blocksize=blocksize,
        quant_storage=storage,
    )
    layer.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return layer.to("cpu")  # bitsandbytes quantises on the move


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bytes(a[k]), _bytes(b[k])), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dq", [True, False])
def test_linear4bit_to_nf4_is_byte_for_byte(dtype, dq):
    lin = _dense(dtype=dtype)
    layer = _linear4bit(lin, dq)
    q = nf4_from_bnb(layer)
    # the same bytes lorazoo's own quantiser writes for that weight
    _same_bytes(q.tensors(), quantize_nf4(lin.weight.detach(), dq).tensors())
    # and the same as the layer's own fields
    qs = layer.weight.quant_state
    assert torch.equal(q.codes, _bytes(layer.weight.data))
    assert torch.equal(_bytes(q.absmax), _bytes(qs.absmax))
    if dq:
        assert torch.equal(q.absmax_scale, qs.state2.absmax) and torch.equal(
            q.absmax_offset, qs.offset.reshape(())
        )
    else:
        assert q.absmax_scale is None and q.absmax_offset is None
    assert q.shape == lin.weight.shape and q.dtype == dtype
    # the dequantised view equals bitsandbytes' dequantize_4bit exactly
    ref = bnbF.dequantize_4bit(layer.weight.data, qs, quant_type="nf4")
    assert ref.dtype == dtype
    assert torch.equal(dequantize_nf4(q), ref)
    # copies, not views of the layer's storage
    assert q.codes.data_ptr() != layer.weight.data.data_ptr()


@pytest.mark.parametrize("dq", [True, False])
def test_nf4linear_from_bnb_computes_what_the_dequantised_weight_gives(dq):
    lin = _dense()
    layer = _linear4bit(lin, dq)
    ours = nf4linear_from_bnb(layer)
    assert ours.double_quant == dq and not ours.bias.requires_grad
    assert torch.equal(ours.bias, layer.bias) and ours.bias.data_ptr() != layer.bias.data_ptr()
    x = torch.randn(5, 96)
    ref = nn.functional.linear(
        x, bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state), layer.bias
    )
    assert torch.equal(ours(x), ref)


@pytest.mark.parametrize("dq", [True, False])
def test_to_bnb_and_back_is_byte_for_byte(dq):
    lin = _dense()
    ours = NF4Linear.from_linear(lin, double_quant=dq)
    theirs = to_bnb(ours, compute_dtype=torch.float32)
    assert is_linear4bit(theirs) and not is_linear4bit(ours)
    # the state dict bitsandbytes writes equals that of a layer it quantised itself
    _same_bytes(theirs.state_dict(), _linear4bit(lin, dq).state_dict())
    _same_bytes(nf4_from_bnb(theirs).tensors(), ours.nf4().tensors())
    assert theirs.weight.data.data_ptr() != ours.weight_codes.data_ptr()
    x = torch.randn(3, 96)
    with torch.no_grad():
        y = theirs(x)
    if getattr(theirs, "support_avx512bf16_for_cpu", False):  # bitsandbytes computes in bf16 there
        assert torch.allclose(y, ours(x), rtol=1e-2, atol=1e-2)
    else:
        assert torch.equal(y, ours(x))
    # the forward may repack the bytes in place (AVX512-BF16): the state dict is still the same
    _same_bytes(nf4_from_bnb(theirs).tensors(), ours.nf4().tensors())


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_other_quant_storage_dtypes_hold_the_same_bytes(storage):
    lin = _dense()
    layer = _linear4bit(lin, True, storage=storage)
    assert layer.weight.dtype == storage
    _same_bytes(nf4_from_bnb(layer).tensors(), quantize_nf4(lin.weight.detach(), True).tensors())


def test_conversion_after_an_eval_forward_reads_the_standard_layout():
    lin = _dense()
    layer = _linear4bit(lin, True).eval()
    expected = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        layer(torch.randn(2, 96))
    _same_bytes(layer.state_dict(), expected)
    _same_bytes(nf4_from_bnb(layer).tensors(), quantize_nf4(lin.weight.detach(), True).tensors())


def test_refusals_name_the_field():
    lin = _dense()
    with pytest.raises(ConfigError, match="quant_type is 'fp4'"):
        nf4_from_bnb(_linear4bit(lin, True, quant_type="fp4"))
    with pytest.raises(ConfigError, match="blocksize is 128"):
        nf4_from_bnb(_linear4bit(lin, False, blocksize=128))
    with pytest.raises(ConfigError, match="Linear4bit"):
        nf4_from_bnb(lin)
    ours = NF4Linear.from_linear(lin)
    ours.hold_dense(ours.dequantized_weight())
    with pytest.raises(ConfigError, match="dense"):
        to_bnb(ours)
    ours.drop_dense()
    with pytest.raises(ConfigError, match="own bias"):
        to_bnb(ours, bias=torch.zeros(70))
    with pytest.raises(ConfigError, match="2-D"):
        to_bnb(quantize_nf4(torch.randn(130)))


def test_a_transformers_model_loaded_in_4bit_converts_layer_by_layer(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(cfg)
    dense.save_pretrained(tmp_path)
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=quant, device_map="cpu"
    )
    found = [(n, m) for n, m in model.named_modules() if is_linear4bit(m)]
    assert len(found) == 7 * cfg.num_hidden_layers
    for name, m in found:
        q = nf4_from_bnb(m)
        original = dense.get_submodule(name).weight.detach()
        _same_bytes(q.tensors(), quantize_nf4(original, True).tensors())
        assert torch.equal(dequantize_nf4(q), bnbF.dequantize_4bit(m.weight.data, m.weight.quant_state))
