"""NF4Linear and whole-model quantize / dequantize."""

from __future__ import annotations

import builtins
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorazoo
from lorazoo.bench.model import LlamaConfig, LlamaLike
from lorazoo.errors import ConfigError, TargetError
from lorazoo.quant import NF4Linear, dequantize_nf4, quant_error, quantize_nf4
from lorazoo.quant import model as quant_model

CFG = LlamaConfig(
    vocab_size=64, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=2, max_seq_len=32
)


def _linear(d_in=96, d_out=70, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    with torch.no_grad():
        if bias:
            lin.bias.normal_()
    return lin


# ---- the layer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dq", [True, False])
def test_forward_and_input_grad_equal_dense_on_dequantised_weight(dtype, bias, dq):
    lin = _linear(bias=bias, dtype=dtype)
    layer = NF4Linear.from_linear(lin, double_quant=dq)
    dense = layer.to_linear()
    assert dense.weight.dtype == dtype
    for shape in [(5, 96), (2, 3, 96)]:
        x = torch.randn(shape).to(dtype)
        x1 = x.clone().requires_grad_(True)
        x2 = x.clone().requires_grad_(True)
        y1, y2 = layer(x1), dense(x2)
        assert y1.dtype == dtype
        assert torch.equal(y1, y2)
        g = torch.randn_like(y1)
        y1.backward(g)
        y2.backward(g)
        assert torch.equal(x1.grad, x2.grad)


def test_compute_dtype_follows_the_input():
    lin = _linear()
    layer = NF4Linear.from_linear(lin)
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    ref = nn.functional.linear(x, layer.dequantized_weight(torch.bfloat16), lin.bias.to(torch.bfloat16))
    assert torch.equal(layer(x), ref)


def test_no_weight_gradient_and_bias_gradient_on_request():
    lin = _linear()
    layer = NF4Linear.from_linear(lin)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == []
    assert all(not b.requires_grad for b in layer.buffers())
    layer.bias.requires_grad_(True)
    dense = layer.to_linear()
    x = torch.randn(6, 96)
    layer(x).square().sum().backward()
    dense(x).square().sum().backward()
    assert torch.allclose(layer.bias.grad, dense.bias.grad, rtol=1e-6, atol=1e-6)
    assert dense.weight.grad is not None  # the dense layer has one; the NF4 layer has no weight


def test_backward_uses_the_weight_of_the_forward():
    layer = NF4Linear.from_linear(_linear())
    dense = layer.to_linear()
    x = torch.randn(3, 96, requires_grad=True)
    y = layer(x)
    layer.load_nf4(quantize_nf4(torch.randn(70, 96)))  # replaced before backward
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    dense(x2).sum().backward()
    assert torch.equal(x.grad, x2.grad)


@pytest.mark.parametrize("dq", [True, False])
def test_state_dict_round_trip_is_byte_exact(dq, tmp_path):
    from safetensors.torch import load_file, save_file

    layer = NF4Linear.from_linear(_linear(dtype=torch.bfloat16), double_quant=dq)
    sd = layer.state_dict()
    expected = {"weight_codes", "weight_absmax", "bias"}
    if dq:
        expected |= {"weight_absmax_scale", "weight_absmax_offset"}
    assert set(sd) == expected
    assert sd["weight_codes"].dtype == torch.uint8
    assert sd["weight_absmax"].dtype == (torch.uint8 if dq else torch.float32)
    save_file(sd, tmp_path / "l.safetensors")
    fresh = NF4Linear(96, 70, bias=True, double_quant=dq, weight_dtype=torch.bfloat16)
    fresh.load_state_dict(load_file(tmp_path / "l.safetensors"))
    for k, v in sd.items():
        w = fresh.state_dict()[k]
        assert w.dtype == v.dtype, k
        assert torch.equal(w.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), layer(x))


def test_state_dict_of_the_wrong_kind_fails_loudly():
    layer = NF4Linear.from_linear(_linear(), double_quant=True)
    other = NF4Linear(96, 70, double_quant=False)
    with pytest.raises(RuntimeError):
        other.load_state_dict(layer.state_dict())


def test_dtype_moves_keep_the_packed_storage():
    layer = NF4Linear.from_linear(_linear())
    before = {k: v.clone() for k, v in layer.state_dict().items() if k != "bias"}
    layer.to(torch.bfloat16)
    assert layer.weight_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    layer.half()
    assert layer.weight_dtype == torch.float16
    for k, v in layer.state_dict().items():
        if k != "bias":
            assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert layer.to_linear().weight.dtype == torch.float16


def test_to_linear_and_from_linear():
    lin = _linear()
    layer = NF4Linear.from_linear(lin)
    dense = layer.to_linear()
    assert isinstance(dense, nn.Linear) and dense.weight.requires_grad
    assert torch.equal(dense.weight, dequantize_nf4(layer.nf4()))
    assert torch.equal(dense.bias, lin.bias) and dense.bias.data_ptr() != lin.bias.data_ptr()
    assert torch.equal(layer.to_linear(torch.float16).weight, dequantize_nf4(layer.nf4(), torch.float16))
    with pytest.raises(ConfigError, match="nn.Linear"):
        NF4Linear.from_linear(nn.Embedding(4, 4))
    with pytest.raises(ConfigError, match="features"):
        layer(torch.randn(2, 95))
    with pytest.raises(ConfigError, match="does not fit"):
        layer.load_nf4(quantize_nf4(torch.randn(70, 95)))


@settings(max_examples=20, deadline=None)
@given(
    d_in=st.integers(1, 80),
    d_out=st.integers(1, 80),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    dq=st.booleans(),
)
def test_layer_property_forward_equals_dense(d_in, d_out, dtype, dq):
    lin = nn.Linear(d_in, d_out).to(dtype)
    layer = NF4Linear.from_linear(lin, double_quant=dq)
    x = torch.randn(3, d_in).to(dtype)
    assert torch.equal(layer(x), layer.to_linear()(x))


# ---- the model ----------------------------------------------------------------------------------


def _model(seed=0):
    torch.manual_seed(seed)
    return LlamaLike(CFG).eval()


def test_quantize_all_linear_skips_the_head_and_matches_dequantised_model():
    model = _model()
    report = lorazoo.quantize(model)
    nf4 = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert len(nf4) == 7 * CFG.num_layers == len(report.layers)
    assert isinstance(model.lm_head, nn.Linear)
    ids = torch.randint(0, CFG.vocab_size, (2, 12))
    dense = copy.deepcopy(model)
    assert lorazoo.dequantize(dense) == nf4
    assert not any(isinstance(m, NF4Linear) for m in dense.modules())
    with torch.no_grad():
        assert torch.equal(model(ids), dense(ids))


def test_quantize_report_errors():
    model = _model()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = lorazoo.quantize(model, targets=["q_proj", "down_proj"], double_quant=False)
    assert set(report.layers) == {n for n in weights if n.endswith(("q_proj", "down_proj"))}
    for path, err in report.layers.items():
        layer = model.get_submodule(path)
        assert err == quant_error(weights[path], layer.nf4())
        assert 0.05 < err.relative < 0.15 and err.bits_per_param == 4.5
    assert report.worst[1].relative == max(e.relative for e in report.layers.values())


def _snapshot(model):
    return [(n, m) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    mods, sd = snap
    assert [(n, id(m)) for n, m in model.named_modules()] == [(n, id(m)) for n, m in mods]
    now = model.state_dict()
    assert set(now) == set(sd) and all(torch.equal(now[k], sd[k]) for k in sd)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_quantize_is_atomic_when_a_layer_fails(monkeypatch, exc):
    model = _model()
    snap = _snapshot(model)
    real = NF4Linear.from_linear.__func__
    calls = []

    def flaky(cls, lin, double_quant=True):
        calls.append(1)
        if len(calls) == 5:
            raise exc("boom")
        return real(cls, lin, double_quant)

    monkeypatch.setattr(NF4Linear, "from_linear", classmethod(flaky))
    with pytest.raises(exc):
        lorazoo.quantize(model)
    _unchanged(model, snap)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_quantize_is_atomic_when_the_swap_fails(monkeypatch, exc):
    model = _model()
    snap = _snapshot(model)
    calls = []

    def flaky_setattr(obj, name, value):
        calls.append(1)
        if len(calls) == 6:
            raise exc("boom")
        builtins.setattr(obj, name, value)

    monkeypatch.setattr(quant_model, "setattr", flaky_setattr, raising=False)
    with pytest.raises(exc):
        lorazoo.quantize(model)
    _unchanged(model, snap)


def test_dequantize_is_atomic(monkeypatch):
    model = _model()
    lorazoo.quantize(model)
    snap = _snapshot(model)
    calls = []

    def flaky_setattr(obj, name, value):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        builtins.setattr(obj, name, value)

    monkeypatch.setattr(quant_model, "setattr", flaky_setattr, raising=False)
    with pytest.raises(KeyboardInterrupt):
        lorazoo.dequantize(model)
    _unchanged(model, snap)


def test_quantize_bad_targets_change_nothing():
    model = _model()
    snap = _snapshot(model)
    with pytest.raises(TargetError, match="q_proj"):
        lorazoo.quantize(model, targets="q_prj")
    with pytest.raises(TargetError, match="plain nn.Linear"):
        lorazoo.quantize(model, targets=["q_proj", nn.Embedding])
    _unchanged(model, snap)


def test_quantize_refuses_adapted_layers():
    model = _model()
    lorazoo.inject(model, "lora", targets=["q_proj"], r=2, alpha=2)
    with pytest.raises(TargetError, match="before adding adapters"):
        lorazoo.quantize(model, targets=["q_proj", "v_proj"])
    assert not any(isinstance(m, NF4Linear) for m in model.modules())


def test_quantized_model_trains_through_the_frozen_base():
    model = _model()
    lorazoo.quantize(model)
    ids = torch.randint(0, CFG.vocab_size, (2, 12))
    emb = model.model.embed_tokens.weight
    model.requires_grad_(False)
    emb.requires_grad_(True)
    model.loss(ids).backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
