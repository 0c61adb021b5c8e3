"""Fuzz of the adapter-file reader: whatever the bytes or the header say, ``lorazoo.load``
either loads the adapter or raises :class:`lorazoo.AdapterFileError`, and on error the model is
bit for bit as it was.

Two generators: byte-level mutations of valid files (overwritten, inserted and deleted bytes,
cuts), and structured mutations of their JSON (the safetensors header and the adapter document):
values replaced by arbitrary JSON of any type, keys removed or added, values wrapped in deep
nesting. Example counts follow the hypothesis profile of ``conftest.py`` (a fixed, derandomised
set when ``CI`` is set).
"""

import functools
import json
import tempfile
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st
from test_engine import Net, assert_same, state

import lorazoo
from lorazoo.testing import perturb

VARIANTS = ("lora", "dora", "vera", "olora")


@functools.cache
def valid_blob(variant: str) -> bytes:
    model = Net()
    hyper = {"r": 4} if variant == "vera" else {"r": 4, "alpha": 8}
    lorazoo.inject(model, variant, targets=["q_proj", "v_proj"], **hyper)
    perturb(model, 3)
    with tempfile.TemporaryDirectory() as d:
        return lorazoo.save(model, Path(d) / "a.safetensors").read_bytes()


def split(blob: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def target(variant: str, existing: bool) -> torch.nn.Module:
    model = Net()
    if existing:
        hyper = {"r": 4} if variant == "vera" else {"r": 4, "alpha": 8}
        lorazoo.inject(model, variant, targets=["q_proj", "v_proj"], **hyper)
        perturb(model, 5)
    return model


def check_load(blob: bytes, variant: str, existing: bool) -> None:
    model = target(variant, existing)
    before = state(model)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzzed.safetensors"
        path.write_bytes(blob)
        try:
            lorazoo.load(model, path)
        except lorazoo.AdapterFileError:
            assert_same(before, model)
            return
    assert "default" in lorazoo.adapter_names(model)


# ---- byte-level mutations ---------------------------------------------------------------------

edit = st.tuples(
    st.sampled_from(["set", "insert", "delete"]),
    st.floats(0.0, 1.0, exclude_max=True),  # where, as a fraction of the length
    st.integers(0, 255),
    st.booleans(),  # confine to the first 8 + header bytes (most of what parses is there)
)


def mutate_bytes(blob: bytes, edits: list, cut: float | None) -> bytes:
    out = bytearray(blob)
    header_end = 8 + int.from_bytes(blob[:8], "little")
    for op, where, value, in_header in edits:
        span = min(header_end, len(out)) if in_header else len(out)
        if span == 0:
            break
        i = int(where * span)
        if op == "set":
            out[i] = value
        elif op == "insert":
            out.insert(i, value)
        else:
            del out[i]
    if cut is not None:
        out = out[: int(cut * len(out))]
    return bytes(out)


@given(
    variant=st.sampled_from(VARIANTS),
    existing=st.booleans(),
    edits=st.lists(edit, min_size=1, max_size=6),
    cut=st.none() | st.floats(0.0, 1.0),
)
def test_byte_mutations_load_or_refuse(variant, existing, edits, cut):
    check_load(mutate_bytes(valid_blob(variant), edits, cut), variant, existing)


# ---- structured header mutations --------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["lora", "vera", "dora", "F32", "I64", "torch.float32", "linear", "embedding"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def paths(value, prefix=()):
    """Every path (tuple of keys/indices) into a JSON value, the root excluded."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        out.append((*prefix, k))
        out.extend(paths(v, (*prefix, k)))
    return out


def apply(value, path, op, new, depth):
    """``value`` (deep-copied) with ``op`` done at ``path``."""
    value = json.loads(json.dumps(value))
    *parents, last = path
    holder = value
    for k in parents:
        holder = holder[k]
    if op == "replace":
        holder[last] = new
    elif op == "delete":
        del holder[last]
    elif op == "add" and isinstance(holder, dict):
        holder[f"extra_{last}"] = new
    elif op == "add":
        holder.append(new)
    else:  # nest
        wrapped = holder[last]
        for _ in range(depth):
            wrapped = [wrapped]
        holder[last] = wrapped
    return value


mutation = st.tuples(
    st.sampled_from(["replace", "delete", "add", "nest"]),
    st.integers(0, 10**6),  # which path
    json_values,
    st.sampled_from([1, 3, 40, 300]),  # nesting depth for "nest" (deeper: test_io_safety)
)


@given(
    variant=st.sampled_from(VARIANTS),
    existing=st.booleans(),
    in_document=st.booleans(),
    mutations=st.lists(mutation, min_size=1, max_size=3),
)
def test_structured_header_mutations_load_or_refuse(variant, existing, in_document, mutations):
    header, data = split(valid_blob(variant))
    doc = json.loads(header["__metadata__"]["lorazoo.adapter"])
    value = doc if in_document else header
    for op, which, new, depth in mutations:
        where = paths(value)
        if not where:
            break
        value = apply(value, where[which % len(where)], op, new, depth)
    if in_document:
        header["__metadata__"]["lorazoo.adapter"] = json.dumps(value)
    else:
        header = value
    try:
        blob = join(header, data)
    except (ValueError, RecursionError):  # json.dumps of a very deep value: write it as is
        return
    check_load(blob, variant, existing)


def test_mutation_helpers_change_what_they_say():
    """The generators above reach the header's and the document's values."""
    header, data = split(valid_blob("lora"))
    doc = json.loads(header["__metadata__"]["lorazoo.adapter"])
    where = paths(doc)
    assert ("config", "r") in where and ("modules", "block.q_proj", "d_out") in where
    assert apply(doc, ("config", "r"), "replace", "4", 1)["config"]["r"] == "4"
    assert "variant" not in apply(doc, ("variant",), "delete", None, 1)
    assert apply(doc, ("dtype",), "nest", None, 3)["dtype"] == [[["torch.float32"]]]
    assert mutate_bytes(b"abcdef", [("set", 0.0, 65, False)], None) == b"Abcdef"
    assert mutate_bytes(b"abcdef", [("delete", 0.5, 0, False)], 0.5) == b"ab"
