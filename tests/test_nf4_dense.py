"""NF4Linear's storage operations: holding a dense (merged) weight in place of the packed
storage, dropping it with the packed bytes back bit for bit, requantising on export, and the
dense layer it dequantises to."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorazoo
from lorazoo.bench.model import LlamaConfig, LlamaLike
from lorazoo.engine import _interrupt
from lorazoo.errors import ConfigError, MergeError
from lorazoo.quant import NF4Linear, quant_error, quantize_nf4


class Interrupt(KeyboardInterrupt):
    pass


def _layer(d_in=96, d_out=70, dtype=torch.float32, dq=True, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    if bias:
        with torch.no_grad():
            lin.bias.normal_()
    return NF4Linear.from_linear(lin, double_quant=dq)


def _merged(layer: NF4Linear, seed=1, r=4) -> torch.Tensor:
    """``cast(dequant(Q) + s·B·A)`` formed in float32, as a merge forms it."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, layer.in_features, generator=g)
    b = torch.randn(layer.out_features, r, generator=g) * 0.05
    w = layer.dequantized_weight(torch.float32) + 0.5 * (b @ a)
    return w.to(layer.weight_dtype)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).clone()


def _packed(layer: NF4Linear) -> dict[str, tuple[torch.dtype, torch.Tensor, int]]:
    out = {}
    for name in ("weight_codes", "weight_absmax", "weight_absmax_scale", "weight_absmax_offset"):
        t = layer._buffers.get(name)
        if t is not None:
            out[name] = (t.dtype, _bytes(t), t.data_ptr())
    return out


def _snapshot(layer: NF4Linear) -> tuple:
    sd = {k: (v.dtype, tuple(v.shape), _bytes(v)) for k, v in layer.state_dict().items()}
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(7)).to(layer.weight_dtype)
    with torch.no_grad():
        y = layer(x)
    return sd, _packed(layer), layer.holds_dense, layer.weight_dtype, _bytes(y)


def _same(before: tuple, layer: NF4Linear, what: str, same_storage: bool = True) -> None:
    """Same state dict bytes, packed bytes (the very tensors, with ``same_storage``), mode,
    dtype and output."""
    now = _snapshot(layer)
    sd0, p0, h0, d0, y0 = before
    sd1, p1, h1, d1, y1 = now
    assert sd1.keys() == sd0.keys(), what
    for k in sd0:
        assert sd1[k][:2] == sd0[k][:2] and torch.equal(sd1[k][2], sd0[k][2]), f"{what}: {k}"
    assert p1.keys() == p0.keys(), what
    for k in p0:
        assert p1[k][0] == p0[k][0] and torch.equal(p1[k][1], p0[k][1]), f"{what}: {k}"
        assert p1[k][2] == p0[k][2] or not same_storage, f"{what}: {k} is another tensor"
    assert (h1, d1) == (h0, d0), what
    assert torch.equal(y1, y0), what


# ---- hold / drop ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dq", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_hold_dense_computes_with_it_and_drop_restores_the_packed_bytes(dtype, dq, bias):
    layer = _layer(dtype=dtype, dq=dq, bias=bias)
    before = _snapshot(layer)
    packed_sd = layer.state_dict()
    base = layer.dequantized_weight()
    w = _merged(layer)
    layer.hold_dense(w)
    assert layer.holds_dense and layer.weight is not None and layer.weight.data_ptr() == w.data_ptr()
    assert not layer.weight.requires_grad
    # the state dict is a dense layer's while dense
    sd = layer.state_dict()
    assert set(sd) == ({"weight", "bias"} if bias else {"weight"})
    assert torch.equal(sd["weight"], w)
    x = torch.randn(2, 5, 96).to(dtype).requires_grad_(True)
    y = layer(x)
    ref = nn.functional.linear(x.detach(), w, layer.bias)
    assert torch.equal(y.detach(), ref)
    assert not torch.equal(
        y.detach(), nn.functional.linear(x.detach(), layer.dequantized_weight(), layer.bias)
    )
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(y).matmul(w))
    # the dequantised view is still the packed base
    assert torch.equal(layer.dequantized_weight(), base)
    assert torch.equal(layer.to_linear().weight, base)
    dropped = layer.drop_dense()
    assert dropped.data_ptr() == w.data_ptr() and not layer.holds_dense
    _same(before, layer, "after drop_dense")
    for k, v in layer.state_dict().items():
        assert torch.equal(_bytes(v), _bytes(packed_sd[k])), k


def test_dense_mode_state_dict_loads_into_a_plain_linear_and_back():
    layer = _layer()
    w = _merged(layer)
    layer.hold_dense(w)
    plain = nn.Linear(96, 70)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(4, 96)
    assert torch.equal(plain(x), layer(x))
    other = copy.deepcopy(layer)
    other.drop_dense()
    with pytest.raises(RuntimeError):  # a packed layer refuses a dense state dict, loudly
        other.load_state_dict(layer.state_dict())


def test_dtype_and_device_moves_while_dense_keep_the_packed_bytes():
    layer = _layer()
    packed = _packed(layer)
    layer.hold_dense(_merged(layer))
    dense = layer.weight.detach().clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.weight_dtype == torch.bfloat16
    assert torch.equal(layer.weight, dense.to(torch.bfloat16))
    layer.to("cpu")
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    assert torch.equal(layer(x), nn.functional.linear(x, dense.to(torch.bfloat16), layer.bias))
    layer.drop_dense()
    now = _packed(layer)
    assert now.keys() == packed.keys()
    for k in packed:
        assert now[k][0] == packed[k][0] and torch.equal(now[k][1], packed[k][1]), k
    assert layer.weight_dtype == torch.bfloat16  # the cast made while dense stays in effect
    assert layer(x).dtype == torch.bfloat16


def test_refusals_change_nothing():
    layer = _layer()
    before = _snapshot(layer)
    with pytest.raises(MergeError, match="no dense weight"):
        layer.drop_dense()
    for bad, match in [
        (torch.zeros(96, 70), "70x96"),
        (torch.zeros(70, 96, dtype=torch.int32), "weight_dtype is torch.float32"),
        (torch.zeros(70, 96, dtype=torch.bfloat16), "cast it"),
        (torch.zeros(70, 96, device="meta"), "move it first"),
        ("weights", "70x96"),
    ]:
        with pytest.raises(ConfigError, match=match):
            layer.hold_dense(bad)
        _same(before, layer, f"refused {match}")
    w = _merged(layer)
    layer.hold_dense(w)
    held = _snapshot(layer)
    with pytest.raises(MergeError, match="already holds"):
        layer.hold_dense(w.clone())
    with pytest.raises(MergeError, match="drop_dense"):
        layer.load_nf4(quantize_nf4(torch.randn(70, 96)))
    _same(held, layer, "refused while dense")


def _every_checkpoint(monkeypatch, make, op, undone, done) -> int:
    calls = [0]

    def count() -> None:
        calls[0] += 1

    layer = make()
    monkeypatch.setattr(_interrupt, "checkpoint", count)
    op(layer)
    monkeypatch.setattr(_interrupt, "checkpoint", lambda: None)
    done(layer)
    total = calls[0]
    assert total >= 2, "the operation passes too few checkpoints to test"
    layer = make()
    for k in range(1, total + 1):
        before = _snapshot(layer)
        seen = [0]

        def fail(k=k, seen=seen) -> None:
            seen[0] += 1
            if seen[0] == k:
                raise Interrupt(f"checkpoint {k}")

        monkeypatch.setattr(_interrupt, "checkpoint", fail)
        with pytest.raises(Interrupt):
            op(layer)
        monkeypatch.setattr(_interrupt, "checkpoint", lambda: None)
        undone(before, layer, k)
    op(layer)  # the interrupted operation can then be completed
    done(layer)
    return total


@pytest.mark.parametrize("dq", [True, False])
def test_interrupt_at_every_checkpoint_of_hold_and_drop(monkeypatch, dq):
    w = _merged(_layer(dq=dq))

    def held(layer):
        assert layer.holds_dense and torch.equal(layer.weight, w)

    def undone(before, layer, k):
        _same(before, layer, f"interrupted at checkpoint {k}")

    _every_checkpoint(monkeypatch, lambda: _layer(dq=dq), lambda m: m.hold_dense(w), undone, held)

    reference = _snapshot(_layer(dq=dq))

    def make_held():
        layer = _layer(dq=dq)
        layer.hold_dense(w)
        return layer

    def dropped(layer):
        _same(reference, layer, "dropped", same_storage=False)

    _every_checkpoint(monkeypatch, make_held, lambda m: m.drop_dense(), undone, dropped)


@settings(max_examples=15, deadline=None)
@given(
    d_in=st.integers(1, 70),
    d_out=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    dq=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_hold_then_drop_is_bit_exact(d_in, d_out, dtype, dq, seed):
    layer = _layer(d_in, d_out, dtype=dtype, dq=dq, seed=seed)
    before = _snapshot(layer)
    layer.hold_dense(_merged(layer, seed=seed, r=1))
    layer.drop_dense()
    _same(before, layer, "hold then drop")


# ---- requantising on export ---------------------------------------------------------------------


@pytest.mark.parametrize("dq", [True, False])
def test_export_requantises_the_dense_weight_and_reports_the_error(dq):
    layer = _layer(dq=dq)
    w = _merged(layer)
    layer.hold_dense(w)
    held = _snapshot(layer)
    out, err = layer.export_nf4()
    _same(held, layer, "export leaves the layer as it was")
    assert isinstance(out, NF4Linear) and not out.holds_dense and out.double_quant == dq
    ref = quantize_nf4(w, dq)
    for a, b in zip(out.nf4().tensors().values(), ref.tensors().values(), strict=True):
        assert torch.equal(_bytes(a), _bytes(b))
    assert err == quant_error(w, ref)
    assert 0.01 < err.relative < 0.2 and err.max_abs > 0
    assert torch.equal(out.bias, layer.bias) and out.bias.data_ptr() != layer.bias.data_ptr()
    other, err2 = layer.export_nf4(double_quant=not dq)
    assert other.double_quant == (not dq) and err2 == quant_error(w, quantize_nf4(w, not dq))


def test_export_without_a_dense_weight_copies_the_packed_bytes():
    layer = _layer()
    out, err = layer.export_nf4()
    assert err.relative == 0.0 and err.max_abs == 0.0
    for a, b in zip(out.nf4().tensors().values(), layer.nf4().tensors().values(), strict=True):
        assert torch.equal(_bytes(a), _bytes(b)) and a.data_ptr() != b.data_ptr()
    x = torch.randn(2, 96)
    assert torch.equal(out(x), layer(x))


# ---- to_linear / dequantize -----------------------------------------------------------------------


def test_from_nf4_takes_the_storage_and_copies_the_bias():
    lin = nn.Linear(96, 70).to(torch.bfloat16)
    q = quantize_nf4(lin.weight.detach())
    layer = NF4Linear.from_nf4(q, lin.bias)
    assert layer.weight_codes is q.codes and layer.weight_dtype == torch.bfloat16
    assert torch.equal(layer.bias, lin.bias) and layer.bias.data_ptr() != lin.bias.data_ptr()
    assert not layer.bias.requires_grad
    assert NF4Linear.from_nf4(q).bias is None
    with pytest.raises(ConfigError, match="2-D"):
        NF4Linear.from_nf4(quantize_nf4(torch.randn(130)))


def test_to_linear_keeps_the_bias_object_on_request():
    layer = _layer(dtype=torch.bfloat16)
    layer.bias.requires_grad_(True)
    kept = layer.to_linear(keep_bias=True)
    assert kept.bias is layer.bias and kept.bias.requires_grad
    assert torch.equal(kept.weight, layer.dequantized_weight())
    copied = layer.to_linear()
    assert copied.bias is not layer.bias and copied.bias.data_ptr() != layer.bias.data_ptr()
    assert torch.equal(copied.bias, layer.bias)
    with pytest.raises(ConfigError, match="keep_bias"):
        layer.to_linear(torch.float32, keep_bias=True)
    assert layer.to_linear(torch.float32).bias.dtype == torch.float32


def test_dequantize_keeps_bias_objects_and_refuses_dense_layers():
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    model = LlamaLike(cfg).eval()
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is None:
            m.bias = nn.Parameter(torch.randn(m.out_features))
    lorazoo.quantize(model)
    biases = {n: m.bias for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    held = model.get_submodule(next(iter(biases)))
    held.hold_dense(_merged(held))
    with pytest.raises(MergeError, match="unmerge first"):
        lorazoo.dequantize(model)
    assert all(isinstance(model.get_submodule(n), NF4Linear) for n in biases)
    held.drop_dense()
    assert lorazoo.dequantize(model) == list(biases)
    for n, b in biases.items():
        assert model.get_submodule(n).bias is b


@pytest.mark.parametrize("op_name", ["hold", "drop"])
def test_interrupt_at_every_line_is_old_or_new_state(op_name):
    """A KeyboardInterrupt can arrive at any line, not only at checkpoints: raise at the k-th
    line executed in lorazoo/quant/linear.py during the operation, for every k of a clean run;
    afterwards the layer is in its old state or in the complete new one."""
    import sys

    from lorazoo.quant import linear as linear_module

    w = _merged(_layer())

    def fresh() -> NF4Linear:
        layer = _layer()
        if op_name == "drop":
            layer.hold_dense(w)
        return layer

    def op(layer: NF4Linear) -> None:
        if op_name == "hold":
            layer.hold_dense(w)
        else:
            layer.drop_dense()

    done = fresh()
    op(done)
    new = _snapshot(done)
    src = linear_module.__file__

    def run(fail_at):
        count = 0

        def local(frame, event, arg):
            nonlocal count
            if event == "line":
                count += 1
                if count == fail_at:
                    raise Interrupt(f"line {frame.f_lineno}")
            return local

        def global_(frame, event, arg):
            return local if frame.f_code.co_filename == src and event == "call" else None

        layer = fresh()
        before = _snapshot(layer)
        previous = sys.gettrace()
        sys.settrace(global_)
        try:
            op(layer)
            raised = False
        except Interrupt:
            raised = True
        finally:
            sys.settrace(previous)
        return count, layer, before, raised

    total, _, _, raised = run(None)
    assert not raised and total > 10
    for k in range(1, total + 1):
        _, layer, before, raised = run(k)
        assert raised
        try:
            _same(before, layer, f"interrupted at line {k}")
        except AssertionError:
            _same(new, layer, f"interrupted at line {k}: neither old nor new", same_storage=False)
