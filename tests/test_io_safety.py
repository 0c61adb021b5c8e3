"""Adapter files a user should not be able to hurt themselves with: loads into merged adapters or
adapters of another config, headers that claim huge ranks, large files that are not adapters,
hostile headers, and saves killed halfway."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_engine import Net, assert_same, state

import lorazoo
from lorazoo.testing import perturb

TESTS = Path(__file__).resolve().parent
X = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))


def _trained(variant="lora", seed=3, **hyper):
    model = Net()
    hyper = {"r": 4, "alpha": 8, **hyper} if variant != "vera" else {"r": 4, **hyper}
    lorazoo.inject(model, variant, targets=["q_proj", "v_proj"], **hyper)
    perturb(model, seed)
    model.eval()
    return model


def split(blob: bytes) -> tuple[dict, bytes]:
    """(header as a dict, data bytes) of a safetensors blob."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join(header, data: bytes = b"") -> bytes:
    """A safetensors blob from a header (a dict, or raw bytes taken as they are) and data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def with_doc(blob: bytes, change) -> bytes:
    """``blob`` with its adapter document passed through ``change`` (which may return a new one)."""
    header, data = split(blob)
    doc = json.loads(header["__metadata__"]["lorazoo.adapter"])
    doc = change(doc) or doc
    header["__metadata__"]["lorazoo.adapter"] = doc if isinstance(doc, str) else json.dumps(doc)
    return join(header, data)


# ---- a load must not mean something else than the file ---------------------------------------


def test_load_into_merged_adapter_is_refused(tmp_path):
    """Accepted on earlier versions: the merged weights then matched neither adapter (outputs
    off by 0.40 to 0.55 from the file's adapter on random inputs, by 1e-7 from the old one)."""
    path = lorazoo.save(_trained(seed=3), tmp_path / "a.safetensors")
    model = _trained(seed=7)
    lorazoo.merge(model)
    before = state(model)
    with pytest.raises(lorazoo.MergeError, match=r"adapter 'default' is merged into \['block.q_proj'"):
        lorazoo.load(model, path)
    assert_same(before, model)
    lorazoo.unmerge(model)  # the way the message gives works, and gives the file's outputs
    lorazoo.load(model, path)
    lorazoo.merge(model)
    assert torch.allclose(model(X), _trained(seed=3)(X), atol=1e-5)


def test_load_into_another_adapter_while_one_is_merged(tmp_path):
    """Only the adapter being loaded into has to be unmerged; others may stay merged."""
    path = lorazoo.save(_trained(seed=3), tmp_path / "a.safetensors")
    model = _trained(seed=7)
    lorazoo.inject(model, "lora", targets=["q_proj", "v_proj"], r=4, alpha=8, name="other")
    lorazoo.set_active(model, ["default"])
    lorazoo.merge(model)
    lorazoo.load(model, path, name="other")
    lorazoo.unmerge(model)
    lorazoo.set_active(model, ["other"])
    assert torch.equal(model(X), _trained(seed=3)(X))


@pytest.mark.parametrize(
    "variant, built, saved, field",
    [
        ("lora", {"alpha": 8}, {"alpha": 32}, "alpha is 32 in the file but 8"),
        ("rslora", {"dropout": 0.0}, {"dropout": 0.1}, "dropout is 0.1 in the file but 0.0"),
        ("dora", {}, {"rslora": True}, "rslora is True in the file but False"),
        ("olora", {}, {"rslora": True}, "rslora is True in the file but False"),
        ("vera", {}, {"projection_prng_key": 5}, "projection_prng_key is 5 in the file but 0"),
        ("vera", {}, {"d_initial": 0.5}, "d_initial is 0.5 in the file but 0.1"),
    ],
)
def test_load_with_another_config_is_refused_naming_fields(tmp_path, variant, built, saved, field):
    """Ignored on earlier versions: the model kept its config and its outputs differed from the
    file's adapter by up to 1.68 (LoRA alpha 8 vs 32), 0.19 (DoRA rslora), 0.037 (VeRA seed)."""
    source = _trained(variant, **saved)
    path = lorazoo.save(source, tmp_path / "a.safetensors")
    model = _trained(variant, seed=9, **built)
    before = state(model)
    with pytest.raises(lorazoo.AdapterFileError, match=f"another config.*{field}.*lorazoo.eject"):
        lorazoo.load(model, path)
    assert_same(before, model)
    lorazoo.eject(model)  # as the message says: then the file loads as saved
    lorazoo.load(model, path)
    model.eval()
    assert torch.allclose(model(X), source(X), atol=1e-5)


def test_load_with_same_config_replaces_tensors(tmp_path):
    source = _trained("dora", rslora=True)
    path = lorazoo.save(source, tmp_path / "a.safetensors")
    model = _trained("dora", seed=11, rslora=True)
    assert not torch.equal(model(X), source(X))
    lorazoo.load(model, path)
    assert torch.equal(model(X), source(X))


# ---- headers that claim more than the file holds ----------------------------------------------

_MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    sys.path.insert(0, sys.argv[1])
    import lorazoo
    from test_engine import Net
    out = {}
    for path in sys.argv[2:]:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            lorazoo.load(Net(), path)
            err = None
        except BaseException as exc:
            err = type(exc).__name__ + ": " + str(exc)[:300]
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        out[path] = {"error": err, "peak_growth_kib": grown}
    print(json.dumps(out))
    """
)


def _vera_claiming(tmp_path, r: int) -> Path:
    blob = lorazoo.save(_trained("vera"), tmp_path / "v.safetensors").read_bytes()
    bad = tmp_path / f"vera_r{r}.safetensors"
    bad.write_bytes(with_doc(blob, lambda d: d["config"].update(r=r)))
    return bad


def test_vera_header_claiming_a_huge_rank_allocates_nothing(tmp_path):
    """A 1.6 KB VeRA file whose config claims r = 10^7 (5·10^8): earlier versions built the
    shared projections first, a 1907 MiB peak-RSS growth before refusing (a raw allocator
    RuntimeError for 48 GB); now the header's shapes are checked first. Measured in a fresh
    process, whose peak RSS starts from the import alone."""
    files = [_vera_claiming(tmp_path, r) for r in (10**7, 5 * 10**8)]
    assert all(f.stat().st_size < 2048 for f in files)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(TESTS), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    for f in files:
        result = got[str(f)]
        assert result["error"] is not None and result["error"].startswith("AdapterFileError"), result
        assert "vera_lambda_d" in result["error"] and "has shape (4,)" in result["error"], result
        assert result["peak_growth_kib"] < 32 * 1024, result  # was 1_953_152 KiB for r = 10^7


def test_vera_huge_rank_refused_in_process(tmp_path):
    model = Net()
    before = state(model)
    with pytest.raises(lorazoo.AdapterFileError, match=r"\(4,\), but the file's own config"):
        lorazoo.load(model, _vera_claiming(tmp_path, 5 * 10**8))
    assert_same(before, model)


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_large_non_adapter_file_costs_a_header_read(tmp_path):
    """A 64 MiB safetensors file that is not an adapter: earlier versions read it whole (a
    128 MiB traced peak) before "not a lorazoo adapter"; now only its header is read."""
    path = tmp_path / "weights.safetensors"
    save_file({f"layer{i}.weight": torch.zeros(2048, 2048) for i in range(4)}, path)
    assert path.stat().st_size > 64 * 2**20
    model = Net()
    before = state(model)

    def attempt():
        with pytest.raises(lorazoo.AdapterFileError, match="not a lorazoo adapter"):
            lorazoo.load(model, path)

    assert _peak_bytes(attempt) < 2**20
    assert_same(before, model)


def test_large_adapter_for_another_model_costs_a_header_read(tmp_path):
    """A real adapter header over 64 MiB of tensors made for wider layers: refused on shapes
    before its tensor bytes are read."""
    header, _ = split(lorazoo.save(_trained(), tmp_path / "a.safetensors").read_bytes())
    doc = json.loads(header["__metadata__"]["lorazoo.adapter"])
    r = 256
    tensors = {}
    for mpath, info in doc["modules"].items():
        info["d_in"] *= 100
        tensors[f"{mpath}.lora_A"] = torch.zeros(r, info["d_in"])
        tensors[f"{mpath}.lora_B"] = torch.zeros(info["d_out"], r)
    doc["config"]["r"] = r
    big = tmp_path / "big.safetensors"
    save_file(tensors, big, metadata={**header["__metadata__"], "lorazoo.adapter": json.dumps(doc)})
    model = Net()
    lorazoo.inject(model, "lora", targets=["q_proj", "v_proj"], r=4, alpha=8)  # exists, other shapes
    before = state(model)

    def attempt():
        with pytest.raises(lorazoo.AdapterFileError, match="in the file but"):
            lorazoo.load(model, big)
        with pytest.raises(lorazoo.AdapterFileError, match="was made for the linear layer"):
            lorazoo.load(Net(), big)

    assert big.stat().st_size > 2 * 2**20
    assert _peak_bytes(attempt) < 2**20
    assert_same(before, model)


def test_valid_load_reads_each_tensor_once(tmp_path):
    """The bytes read for a valid load are about the tensors' size (no whole-file copies)."""
    source = Net()
    lorazoo.inject(source, "lora", targets=["q_proj", "v_proj"], r=16, alpha=8)
    perturb(source, 1)
    path = lorazoo.save(source, tmp_path / "a.safetensors")
    size = path.stat().st_size
    model = Net()
    peak = _peak_bytes(lambda: lorazoo.load(model, path))
    assert peak < 2 * size + 256 * 1024
    assert torch.equal(model.eval()(X), source.eval()(X))


# ---- hostile files: always AdapterFileError, the model bit for bit unchanged ------------------


def _valid(tmp_path) -> bytes:
    return lorazoo.save(_trained(), tmp_path / "valid.safetensors").read_bytes()


def _header_change(change):
    def make(blob):
        header, data = split(blob)
        change(header)
        return join(header, data)

    return make


def _first_tensor(header):
    return next(v for k, v in header.items() if k != "__metadata__")


def _set_meta(key, value):
    return _header_change(lambda h: h["__metadata__"].__setitem__(key, value))


def _doc_set(*keys_and_value):
    *keys, value = keys_and_value

    def change(doc):
        target = doc
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value

    return lambda blob: with_doc(blob, change)


def _doc_del(*keys):
    def change(doc):
        target = doc
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]

    return lambda blob: with_doc(blob, change)


def _nan_values(blob):
    header, data = split(blob)
    slot = header["block.q_proj.lora_A"]
    begin = slot["data_offsets"][0]
    nan = torch.tensor([float("nan")]).numpy().tobytes()
    return join(header, data[:begin] + nan + data[begin + 4 :])


def _overlap(blob):
    header, data = split(blob)
    keys = [k for k in header if k != "__metadata__"]
    a, b = header[keys[0]], header[keys[1]]
    if a["shape"] == b["shape"]:
        b["data_offsets"] = list(a["data_offsets"])
    else:  # shift the second onto the first's bytes, keeping its size
        size = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]
    return join(header, data)


def _rename_tensor(blob):
    header, data = split(blob)
    header["block.q_proj.lora_C"] = header.pop("block.q_proj.lora_A")
    return join(header, data)


def _drop_tensor(blob):
    header, data = split(blob)
    del header["block.v_proj.lora_B"]
    return join(header, data)


def _as_int32(blob):
    header, data = split(blob)
    header["block.q_proj.lora_A"]["dtype"] = "I32"
    return join(header, data)


HOSTILE = {
    "empty file": lambda blob: b"",
    "seven bytes": lambda blob: blob[:7],
    "header length 2**63": lambda blob: (2**63).to_bytes(8, "little") + blob[8:],
    "header length past the end": lambda blob: (len(blob)).to_bytes(8, "little") + blob[8:],
    "header not JSON": lambda blob: join(b"{not json" + b" " * 20, b""),
    "header not UTF-8": lambda blob: join(b'{"\xff\xfe": 1}', b""),
    "header a JSON list": lambda blob: join(b"[1, 2, 3]"),
    "header with NaN": lambda blob: join(b'{"__metadata__": {}, "x": NaN}'),
    "header with duplicate keys": lambda blob: join(b'{"__metadata__": {}, "__metadata__": {}}'),
    "header nested 100000 deep": lambda blob: join(b"[" * 100_000 + b"]" * 100_000),
    "header nested 40 deep": lambda blob: join(b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}"),
    "metadata a list": _header_change(lambda h: h.__setitem__("__metadata__", ["lorazoo.format"])),
    "metadata value an int": _set_meta("lorazoo.format_version", 1),
    "tensor entry without offsets": _header_change(lambda h: _first_tensor(h).pop("data_offsets")),
    "tensor entry a string": _header_change(lambda h: h.__setitem__("block.q_proj.lora_A", "F32")),
    "unknown dtype": _header_change(lambda h: _first_tensor(h).__setitem__("dtype", "F128")),
    "integer tensor": _as_int32,
    "negative size": _header_change(lambda h: _first_tensor(h).__setitem__("shape", [-4, -16])),
    "float size": _header_change(lambda h: _first_tensor(h).__setitem__("shape", [4.0, 16])),
    "boolean size": _header_change(lambda h: _first_tensor(h).__setitem__("shape", [True, 64])),
    "offsets reversed": _header_change(lambda h: _first_tensor(h)["data_offsets"].reverse()),
    "offsets past the end": _header_change(
        lambda h: _first_tensor(h).__setitem__("data_offsets", [0, 10**12])
    ),
    "size not matching offsets": _header_change(lambda h: _first_tensor(h).__setitem__("shape", [4, 17])),
    "overlapping tensors": _overlap,
    "truncated data": lambda blob: blob[:-5],
    "no lorazoo format": _header_change(lambda h: h.__setitem__("__metadata__", {"format": "pt"})),
    "format version 2": _set_meta("lorazoo.format_version", "2"),
    "no document": _header_change(lambda h: h["__metadata__"].pop("lorazoo.adapter")),
    "document not JSON": _set_meta("lorazoo.adapter", "{'variant': 'lora'}"),
    "document a list": _set_meta("lorazoo.adapter", "[]"),
    "document with Infinity": lambda blob: with_doc(
        blob, lambda d: json.dumps(d).replace('"alpha": 8', '"alpha": Infinity')
    ),
    "document nested 100000 deep": _set_meta("lorazoo.adapter", "[" * 100_000 + "]" * 100_000),
    "document config nested 60 deep": _doc_set("config", "alpha", json.loads("[" * 60 + "]" * 60)),
    "no modules": _doc_del("modules"),
    "no variant": _doc_del("variant"),
    "variant a number": _doc_set("variant", 42),
    "variant unknown": _doc_set("variant", "nonesuch"),
    "modules a list": _doc_set("modules", ["block.q_proj"]),
    "modules empty": _doc_set("modules", {}),
    "module a string": _doc_set("modules", "block.q_proj", "linear"),
    "d_out a string": _doc_set("modules", "block.q_proj", "d_out", "24"),
    "d_in a bool": _doc_set("modules", "block.q_proj", "d_in", True),
    "d_in zero": _doc_set("modules", "block.q_proj", "d_in", 0),
    "kind conv": _doc_set("modules", "block.q_proj", "kind", "conv"),
    "kind a list": _doc_set("modules", "block.q_proj", "kind", ["linear"]),
    "module not in model": lambda blob: with_doc(
        blob, lambda d: d["modules"].__setitem__("block.k_proj", d["modules"]["block.q_proj"])
    ),
    "config a list": _doc_set("config", [4, 8]),
    "config unknown key": _doc_set("config", "rank", 4),
    "config r a string": _doc_set("config", "r", "4"),
    "config r a float": _doc_set("config", "r", 4.0),
    "config alpha 1e400": lambda blob: with_doc(
        blob, lambda d: json.dumps(d).replace('"alpha": 8', '"alpha": 1e400')
    ),
    "config alpha null": _doc_set("config", "alpha", None),
    "config r not the tensors'": _doc_set("config", "r", 2),
    "config r above the layer size": _doc_set("config", "r", 10**9),
    "dtype unknown": _doc_set("dtype", "torch.int8"),
    "dtype a dict": _doc_set("dtype", {"torch": "float32"}),
    "name a number": _doc_set("name", 3),
    "NaN in a tensor": _nan_values,
    "unexpected tensor": _rename_tensor,
    "missing tensor": _drop_tensor,
}


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "existing"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file_is_refused_and_model_unchanged(tmp_path, case, existing):
    """Each was accepted, or escaped as a raw error (TypeError, KeyError, AttributeError,
    RecursionError, ...), or refused only after allocating, on some earlier version; the 26
    that were already refused are kept here."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(HOSTILE[case](_valid(tmp_path)))
    model = Net()
    if existing:
        lorazoo.inject(model, "lora", targets=["q_proj", "v_proj"], r=4, alpha=8)
        perturb(model, 5)
    before = state(model)
    with pytest.raises(lorazoo.AdapterFileError):
        lorazoo.load(model, bad)
    assert_same(before, model)


def test_unknown_variant_is_both_error_kinds(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_doc_set("variant", "lroa")(_valid(tmp_path)))
    with pytest.raises(lorazoo.UnknownAdapterVariantError, match="Did you mean 'lora'") as e:
        lorazoo.load(Net(), bad)
    assert isinstance(e.value, lorazoo.AdapterFileError) and isinstance(e.value, lorazoo.UnknownVariantError)


def test_read_header_reads_no_tensor_data(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(_valid(tmp_path)[:-4])  # data cut short: the header alone still reads
    doc, slots = lorazoo.io.read_header(tmp_path / "valid.safetensors")
    assert doc["variant"] == "lora" and slots["block.q_proj.lora_A"] == ("F32", (4, 16))
    with pytest.raises(lorazoo.AdapterFileError, match="corrupt or truncated"):
        lorazoo.io.read_header(path)


# ---- saves killed halfway --------------------------------------------------------------------

_SAVER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    import lorazoo
    from lorazoo.testing import perturb
    from torch import nn
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))
    lorazoo.inject(model, "lora", r=256, alpha=8)
    i = 0
    while True:
        perturb(model, i)
        lorazoo.save(model, sys.argv[2])
        print(i, flush=True)
        i += 1
    """
)


def test_save_killed_by_sigkill_leaves_a_complete_file(tmp_path):
    """``kill -9`` while saving in a loop: the target is always a complete adapter file."""
    target = tmp_path / "a.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for delay in (0.0, 0.05):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(TESTS), str(target)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert proc.stdout.readline().strip() != ""  # one save done
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        doc, slots = lorazoo.io.read_header(target)
        assert doc["variant"] == "lora" and slots["0.lora_A"] == ("F32", (256, 1024))
        _, tensors = lorazoo.io.read(target)
        assert tensors["0.lora_B"].shape == (1024, 256)
        left = {p.name for p in tmp_path.iterdir()} - {"a.safetensors"}
        assert all(name.startswith(".a.safetensors.") and name.endswith(".tmp") for name in left)
