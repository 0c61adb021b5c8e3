"""The ``"base"`` entry of an adapter file's module: what it records about a quantised base
(recipe, dtype, fingerprint) and how a load checks the base it lands on."""

from __future__ import annotations

import json

import pytest
import torch

from lorazoo.errors import AdapterFileError
from lorazoo.io import check_base, nf4_fingerprint, read_base, record_base
from lorazoo.quant import quantize_nf4

WHERE = "'a.safetensors'"


def _q(dq=True, dtype=torch.float32, seed=0, shape=(70, 96)):
    torch.manual_seed(seed)
    return quantize_nf4((torch.randn(shape) * 0.05).to(dtype), dq)


def test_record_is_json_and_reads_back():
    q = _q()
    rec = record_base(q)
    assert rec == {
        "storage": "nf4",
        "quant_type": "nf4",
        "block_size": 64,
        "double_quant": True,
        "dtype": "torch.float32",
        "fingerprint": nf4_fingerprint(q),
    }
    info = json.loads(json.dumps({"d_out": 70, "d_in": 96, "base": rec}))
    assert read_base(WHERE, "l", info) == rec
    assert "fingerprint" not in record_base(q, fingerprint=False)
    assert read_base(WHERE, "l", {"d_out": 70, "d_in": 96}) is None
    assert read_base(WHERE, "l", {"base": None}) is None


def test_fingerprint_sees_every_stored_byte():
    q = _q()
    fp = nf4_fingerprint(q)
    assert len(fp) == 32 and fp == nf4_fingerprint(_q())
    for name in ("codes", "absmax", "absmax_scale", "absmax_offset"):
        t = q.tensors()[name].clone()
        flat = t.reshape(-1).view(torch.uint8)
        flat[0] ^= 1  # one bit of one stored tensor
        changed = type(q)(**{**q.__dict__, name: t})
        assert nf4_fingerprint(changed) != fp, name
    assert nf4_fingerprint(_q(dq=False)) != fp
    assert nf4_fingerprint(_q(dtype=torch.bfloat16)) != nf4_fingerprint(_q())
    # same bytes, another shape
    q2 = type(q)(**{**q.__dict__, "shape": torch.Size((96, 70))})
    assert nf4_fingerprint(q2) != fp


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("storage", 4, "'storage' must be a JSON str"),
        ("block_size", "64", "'block_size' must be a JSON int"),
        ("block_size", True, "'block_size' must be a JSON int"),
        ("double_quant", 1, "'double_quant' must be a JSON bool"),
        ("dtype", "torch.int8", "base dtype"),
        ("fingerprint", "xyz", "32 hex digits"),
        ("levels", 16, "unknown base field 'levels'"),
    ],
)
def test_damaged_entries_are_refused_naming_the_field(field, value, message):
    rec = record_base(_q())
    rec[field] = value
    with pytest.raises(AdapterFileError, match=message) as e:
        read_base(WHERE, "blk.q", {"base": rec})
    assert "damaged" in str(e.value) and "'blk.q'" in str(e.value)
    with pytest.raises(AdapterFileError, match="must be a JSON object"):
        read_base(WHERE, "blk.q", {"base": [1]})


def test_check_accepts_the_same_base_and_no_record():
    q = _q()
    check_base(WHERE, "l", read_base(WHERE, "l", {"base": record_base(q)}), q)
    check_base(WHERE, "l", record_base(q, fingerprint=False), _q(seed=5))  # recipe only
    check_base(WHERE, "l", None, q)  # a file from a dense base fits any layer
    check_base(WHERE, "l", None, None)


@pytest.mark.parametrize(
    "other, field",
    [
        (lambda: _q(dq=False), "double_quant"),
        (lambda: _q(dtype=torch.bfloat16), "dtype"),
    ],
)
def test_check_names_the_differing_recipe_field(other, field):
    rec = record_base(_q())
    with pytest.raises(AdapterFileError, match=f"stored with {field}=") as e:
        check_base(WHERE, "blk.q", rec, other())
    assert "'blk.q'" in str(e.value) and WHERE in str(e.value)


def test_check_names_a_recorded_field_that_this_build_would_not_write():
    rec = record_base(_q())
    for field, value in [("block_size", 128), ("quant_type", "fp4"), ("storage", "int8")]:
        changed = {**rec, field: value}
        with pytest.raises(AdapterFileError, match=f"{field}="):
            check_base(WHERE, "l", changed, _q())


def test_check_tells_other_bytes_from_another_recipe():
    rec = record_base(_q(seed=0))
    with pytest.raises(AdapterFileError, match="other NF4 bytes .* although the recipe matches"):
        check_base(WHERE, "l", rec, _q(seed=1))


def test_check_refuses_a_dense_layer_where_the_file_expects_nf4():
    rec = record_base(_q(dq=False))
    with pytest.raises(AdapterFileError, match="is dense: quantise it") as e:
        check_base(WHERE, "blk.q", rec, None)
    assert "double_quant=False" in str(e.value)
