"""Adapter files: one ``.safetensors`` file per adapter, holding only adapter tensors.

The safetensors header metadata carries ``lorazoo.format`` (``"lorazoo-adapter"``),
``lorazoo.format_version`` and ``lorazoo.adapter``, a JSON document with the variant name, its
config, the adapter dtype and, per adapted module, its path and shape. Tensor keys are
``<module path>.<tensor name>``; state shared by all layers of the adapter (VeRA's projections,
when stored) is kept once under ``__shared__.<tensor name>``. Whole modules trained with the
adapter (:func:`lorazoo.modules_to_save`) are listed in the document's ``modules_to_save``
(``{module path: [state-dict keys]}``) and stored under ``__modules__.<module path>.<key>``.

Writes go to a temporary file in the same folder that is renamed over the target only when
complete, so an interrupted save never leaves a half-written adapter.

Loads trust nothing in the file. They read the 8-byte length and the JSON header alone first and
check it: strict JSON (no NaN, no duplicate keys, at most 32 levels deep), every tensor entry's
dtype, shape and byte range against the file size, the lorazoo document's fields and types. The
tensors the adapter needs are then worked out without allocating them (existing adapters, or an
injection planned on the meta device) and compared with the header's shapes; only then are the
tensor bytes read, from the same open file, and refused if they hold NaN or infinities. A file
that is not an adapter, or does not fit, costs a header read; a header claiming a huge rank
cannot make lorazoo allocate for it. The model changes only at the very end, all or nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import Tensor, nn

from . import __version__, peft_format, registry, trained
from .engine.distributed import accepts_wrapped, copy_into, full_tensor
from .engine.inject import adapter_names, adapters_named, commit, plan
from .engine.layer import layer_dims, layer_kind
from .errors import (
    AdapterFileError,
    LorazooError,
    MergeError,
    UnknownAdapterVariantError,
    UnknownVariantError,
)
from .variant import Variant

FORMAT = "lorazoo-adapter"
FORMAT_VERSION = 1
SHARED = "__shared__"
MODULES = "__modules__"  # key prefix of whole trained module copies (modules_to_save)

_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}


def _layer_tensors(adapter: Variant) -> dict[str, Tensor]:
    return {k: v for k, v in adapter.tensors() if not k.startswith("shared.")}


def _shared_tensors(adapter: Variant) -> dict[str, Tensor]:
    shared = getattr(adapter, "shared", None)
    return dict(shared.state_dict(keep_vars=True)) if isinstance(shared, nn.Module) else {}


def _dtype_of(adapter: Variant) -> torch.dtype:
    for t in adapter.parameters():
        return t.dtype
    return torch.float32


@accepts_wrapped  # a DDP / FSDP / compiled model writes the bare model's paths
def save(
    model: nn.Module, path: str | os.PathLike, name: str = "default", *, format: str = "lorazoo"
) -> Path:
    """Write adapter ``name`` of ``model`` to ``path`` atomically. Returns the path.

    ``format="peft"`` writes a PEFT adapter folder instead (``lorazoo.peft_format``).

    A wrapped model (``DistributedDataParallel``, ``torch.compile``) writes the paths of the
    model inside, so the file loads into the bare model. A model sharded with FSDP2's
    ``fully_shard`` has its adapter tensors gathered, which every process must take part in:
    call ``save`` on every process (each writes the same file), not on one rank only."""
    if format != "lorazoo":
        return peft_format.save_peft(model, path, name, format=format)
    entries = adapters_named(model, name)
    cls = type(entries[0][2])
    config = entries[0][2].config
    tensors: dict[str, Tensor] = {}
    modules: dict[str, Any] = {}
    for mpath, host, adapter in entries:
        for key, t in _layer_tensors(adapter).items():
            tensors[f"{mpath}.{key}"] = full_tensor(t).to("cpu").contiguous()  # gathers a shard
        modules[mpath] = {
            "d_out": host.out_features,
            "d_in": host.in_features,
            "kind": layer_kind(host),
            "base_dtype": str(host.weight.dtype),
            **adapter.extra_metadata(),
        }
        if getattr(host.kind, "storage", "dense") == "nf4":  # the base recipe (as for a dense base,
            # not the base's bytes: an adapter may be loaded onto other weights of the same shape)
            modules[mpath][BASE_KEY] = record_base(host.nf4(), fingerprint=False)
    for key, t in _shared_tensors(entries[0][2]).items():
        tensors[f"{SHARED}.{key}"] = t.detach().to("cpu").contiguous()
    copies = trained.copies_of(model, name)
    for mpath, twin in copies.items():
        for key, t in trained.state_of(twin).items():
            tensors[f"{MODULES}.{mpath}.{key}"] = full_tensor(t).detach().to("cpu").contiguous()
    doc = {
        "name": name,
        "variant": cls.name,
        "plugin": registry.plugin_of(cls.name) if cls.name in registry.variants() else None,
        "config": config.to_dict(),
        "dtype": str(_dtype_of(entries[0][2])),
        "modules": modules,
        "lorazoo_version": __version__,
    }
    if copies:
        doc["modules_to_save"] = {p: sorted(trained.state_of(c)) for p, c in copies.items()}
    return write_file(path, doc, tensors)


def write_file(path: str | os.PathLike, doc: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """Write an adapter document and its tensors as a lorazoo file, atomically: a temporary file
    beside ``path``, flushed to disk, then renamed over it (a crash leaves the old file or the new
    one, never a part)."""
    meta = {
        "lorazoo.format": FORMAT,
        "lorazoo.format_version": str(FORMAT_VERSION),
        "lorazoo.adapter": json.dumps(doc, sort_keys=True),
    }
    blob = st_save({k: t.contiguous() for k, t in tensors.items()}, metadata=meta)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


# ---- reading ----------------------------------------------------------------------------------

# safetensors' own ceiling for the JSON header; a real adapter's header is a few kilobytes.
_MAX_HEADER = 100 * 2**20
# Deepest JSON nesting accepted in a header or document (a real one nests 5 levels).
_MAX_DEPTH = 32
_FLOAT_CODES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ITEM_SIZES = {
    **{code: 1 for code in ("BOOL", "U8", "I8", "F8_E4M3", "F8_E5M2")},
    **{code: 2 for code in ("U16", "I16", "F16", "BF16")},
    **{code: 4 for code in ("U32", "I32", "F32")},
    **{code: 8 for code in ("U64", "I64", "F64")},
}
_KINDS = ("linear", "embedding", "conv")


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages about untrusted input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {_short(key)}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _strict_json(raw: bytes | str) -> Any:
    """Parse JSON as the standard defines it (no NaN/Infinity, no duplicate keys), refusing
    nesting deeper than ``_MAX_DEPTH``. Raises ValueError with the reason."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {_MAX_DEPTH} levels") from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > _MAX_DEPTH:
                raise ValueError(f"JSON nested deeper than {_MAX_DEPTH} levels")
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return value


@dataclass(frozen=True)
class _Slot:
    """Where one tensor lies in the file, as its header says (checked against the file size)."""

    code: str
    shape: tuple[int, ...]
    begin: int
    end: int


class _Reader:
    """An open adapter file whose safetensors header and lorazoo document are read and checked.

    Only the header is read on opening; tensor bytes are read by :meth:`tensors`, from the same
    open file, once the caller has checked the header's shapes against what it expects.
    """

    def __init__(self, path: str | os.PathLike):
        self.where = repr(str(path))
        try:
            self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise AdapterFileError(f"cannot read adapter file {self.where}: {exc}") from exc
        try:
            self.slots, self._data_start, meta = self._read_header()
            self.doc = self._read_document(meta)
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def _corrupt(self, detail: str) -> AdapterFileError:
        return AdapterFileError(
            f"{self.where} is not a readable safetensors file (corrupt or truncated: {detail})"
        )

    def _damaged(self, detail: str) -> AdapterFileError:
        return AdapterFileError(f"{self.where} has a damaged adapter header: {detail}")

    def _read_header(self) -> tuple[dict[str, _Slot], int, dict[str, str]]:
        f = self._file
        try:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise self._corrupt(f"{len(head)} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise self._corrupt(
                    f"the header claims {n} bytes but the file has {size - 8} after its length"
                )
            if n > _MAX_HEADER:
                raise self._corrupt(f"a header of {n} bytes, more than the {_MAX_HEADER} safetensors allows")
            raw = f.read(n)
        except OSError as exc:
            raise AdapterFileError(f"cannot read adapter file {self.where}: {exc}") from exc
        if len(raw) != n:
            raise self._corrupt(f"the header ends after {len(raw)} of its {n} bytes")
        try:
            header = _strict_json(raw)
        except ValueError as exc:
            raise self._corrupt(f"its header is not valid JSON: {exc}") from None
        if not isinstance(header, dict):
            raise self._corrupt(f"its header is a JSON {type(header).__name__}, not an object")
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise self._corrupt("'__metadata__' must map names to strings")
        data_len = size - 8 - n
        slots = {k: self._slot(k, v, data_len) for k, v in header.items() if k != "__metadata__"}
        end = 0
        for key, slot in sorted(slots.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
            if slot.begin < end:
                raise self._corrupt(f"tensor {_short(key)} overlaps the tensor before it")
            end = slot.end
        return slots, 8 + n, meta

    def _slot(self, key: str, info: Any, data_len: int) -> _Slot:
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise self._corrupt(
                f"the entry of tensor {_short(key)} must be an object with exactly 'dtype', 'shape' "
                f"and 'data_offsets', got {_short(info)}"
            )
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(code, str) or code not in _ITEM_SIZES:
            raise self._corrupt(f"tensor {_short(key)} has unknown dtype {_short(code)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise self._corrupt(f"tensor {_short(key)} has shape {_short(shape)}, not a list of sizes >= 0")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise self._corrupt(f"tensor {_short(key)} has data_offsets {_short(offsets)}, not [begin, end]")
        begin, end = offsets
        need = math.prod(shape) * _ITEM_SIZES[code]
        if end - begin != need:
            raise self._corrupt(
                f"tensor {_short(key)} of shape {tuple(shape)} and dtype {code} needs {need} bytes, "
                f"but its data_offsets span {end - begin}"
            )
        if end > data_len:
            raise self._corrupt(
                f"tensor {_short(key)} ends at byte {end} of the data, which holds only {data_len} bytes"
            )
        return _Slot(code, tuple(shape), begin, end)

    def _read_document(self, meta: dict[str, str]) -> dict[str, Any]:
        if meta.get("lorazoo.format") != FORMAT:
            raise AdapterFileError(
                f"{self.where} is a safetensors file but not a lorazoo adapter (no 'lorazoo.format' "
                "header); PEFT adapter folders are not read by lorazoo.load"
            )
        version = meta.get("lorazoo.format_version", "?")
        if version != str(FORMAT_VERSION):
            raise AdapterFileError(
                f"{self.where} has adapter format version {version[:24]}; this lorazoo reads version "
                f"{FORMAT_VERSION}: upgrade lorazoo"
            )
        for key, slot in self.slots.items():
            if slot.code not in _FLOAT_CODES:
                raise AdapterFileError(
                    f"{self.where}: tensor {_short(key)} is not floating point (dtype {slot.code}); "
                    f"adapter tensors are one of {', '.join(_FLOAT_CODES)}"
                )
        if "lorazoo.adapter" not in meta:
            raise self._damaged("no 'lorazoo.adapter' document")
        try:
            doc = _strict_json(meta["lorazoo.adapter"])
        except ValueError as exc:
            raise self._damaged(f"'lorazoo.adapter' is not valid JSON: {exc}") from None
        self._check_document(doc)
        return doc

    def _check_document(self, doc: Any) -> None:
        if not isinstance(doc, dict):
            raise self._damaged(f"the document is a JSON {type(doc).__name__}, not an object")
        for key in ("variant", "config", "dtype", "modules"):
            if key not in doc:
                raise self._damaged(f"field {key!r} is missing")
        for key, kind in (("variant", str), ("config", dict), ("dtype", str), ("modules", dict)):
            if not isinstance(doc[key], kind):
                raise self._damaged(
                    f"field {key!r} must be a JSON {_JSON_NAMES[kind]}, got {_short(doc[key])}"
                )
        for key in ("name", "plugin", "lorazoo_version"):
            if doc.get(key) is not None and not isinstance(doc[key], str):
                raise self._damaged(f"field {key!r} must be a string, got {_short(doc[key])}")
        if doc["dtype"] not in _DTYPES:
            raise AdapterFileError(
                f"{self.where}: unsupported adapter dtype {_short(doc['dtype'])}; one of {', '.join(_DTYPES)}"
            )
        if not doc["modules"]:
            raise self._damaged("'modules' lists no layer")
        for path, info in doc["modules"].items():
            if not isinstance(info, dict):
                raise self._damaged(f"module {_short(path)} must be a JSON object, got {_short(info)}")
            for key in ("d_out", "d_in"):
                if not (_is_int(info.get(key)) and info[key] >= 1):
                    raise self._damaged(
                        f"module {_short(path)}: {key!r} must be an integer >= 1, got {_short(info.get(key))}"
                    )
            if info.get("kind", "linear") not in _KINDS:
                raise self._damaged(
                    f"module {_short(path)}: 'kind' must be one of {_KINDS}, got {_short(info.get('kind'))}"
                )
        saved = doc.get("modules_to_save", {})
        if not isinstance(saved, dict) or not all(
            isinstance(keys, list) and keys and all(isinstance(k, str) for k in keys)
            for keys in saved.values()
        ):
            raise self._damaged(
                f"'modules_to_save' must map module paths to lists of tensor names, got {_short(saved)}"
            )

    def tensors(self, finite: bool = False) -> dict[str, Tensor]:
        """Every tensor of the file, read from the open file. With ``finite``, NaN or infinite
        values are refused."""
        out: dict[str, Tensor] = {}
        for key, slot in self.slots.items():
            dtype = _FLOAT_CODES[slot.code]
            size = slot.end - slot.begin
            if size == 0:
                out[key] = torch.empty(slot.shape, dtype=dtype)
                continue
            buf = bytearray(size)
            try:
                self._file.seek(self._data_start + slot.begin)
                got = self._file.readinto(buf)
            except OSError as exc:
                raise AdapterFileError(f"cannot read adapter file {self.where}: {exc}") from exc
            if got != size:
                raise self._corrupt(f"tensor {_short(key)} ends after {got} of its {size} bytes")
            t = torch.frombuffer(buf, dtype=dtype).reshape(slot.shape)
            if finite and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise AdapterFileError(
                    f"{self.where}: tensor {_short(key)} holds {bad} NaN or infinite values; loading it "
                    "would make the model's outputs NaN (was it saved after a diverged step?)"
                )
            out[key] = t
        return out


_JSON_NAMES = {str: "string", dict: "object"}


class _Converted(_Reader):
    """A document and tensors already in memory (a converted PEFT folder) behind the interface
    :func:`load` reads a file through, so they are checked exactly as a file's are."""

    def __init__(self, path: str | os.PathLike, doc: dict[str, Any], tensors: dict[str, Tensor]):
        self.where = repr(str(path))
        self.doc = doc
        self._held = tensors
        codes = {dtype: code for code, dtype in _FLOAT_CODES.items()}
        self.slots = {}
        for key, t in tensors.items():
            if t.dtype not in codes:
                raise AdapterFileError(f"{self.where}: tensor {_short(key)} has unsupported dtype {t.dtype}")
            self.slots[key] = _Slot(codes[t.dtype], tuple(t.shape), 0, t.numel() * t.element_size())

    def close(self) -> None:
        pass

    def tensors(self, finite: bool = False) -> dict[str, Tensor]:
        if finite:
            for key, t in self._held.items():
                if not bool(torch.isfinite(t).all()):
                    raise AdapterFileError(
                        f"{self.where}: tensor {_short(key)} holds NaN or infinite values; loading it "
                        "would make the model's outputs NaN"
                    )
        return dict(self._held)


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The adapter document and tensors of a file, validated for format (not for a model)."""
    with _Reader(path) as f:
        return f.doc, f.tensors()


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, tuple[str, tuple[int, ...]]]]:
    """The adapter document and ``{tensor key: (safetensors dtype, shape)}`` of a file, validated
    for format, without reading any tensor data."""
    with _Reader(path) as f:
        return f.doc, {k: (s.code, s.shape) for k, s in f.slots.items()}


# ---- loading ----------------------------------------------------------------------------------


@accepts_wrapped
def load(model: nn.Module, path: str | os.PathLike, name: str = "default") -> nn.Module:
    """Load an adapter file into ``model`` as adapter ``name``.

    If the model has no adapter ``name`` yet, it is injected with the file's variant, config and
    modules. If it has one, it must be of the file's variant and config, adapt the same modules
    and not be merged; its tensors are then replaced by the file's. The file's header is read and
    checked first (format, document, every tensor's dtype, shape and place in the file, against
    what the adapter needs) before any tensor data is read or any adapter tensor is allocated.
    On any mismatch, or a corrupt or truncated file, :class:`AdapterFileError` is raised (an
    adapter merged into the weights gives :class:`MergeError`) and the model is unchanged, also
    when the load is interrupted. Returns ``model``.
    """
    # A PEFT folder (or a pickle, to refuse) is read by lorazoo.peft_format, then checked as a file is.
    opened = (
        _Converted(path, *peft_format.read_peft(path, model)) if peft_format.handles(path) else _Reader(path)
    )
    with opened as f:
        cls = _variant_of(f)
        try:
            config = cls.config_class.from_kwargs(**f.doc["config"])
        except Exception as exc:
            raise AdapterFileError(f"{f.where}: its config does not fit variant {cls.name!r}: {exc}") from exc
        file_modules: dict[str, Any] = f.doc["modules"]
        dtype = _DTYPES[f.doc["dtype"]]
        saved_modules: dict[str, list[str]] = f.doc.get("modules_to_save") or {}
        if name in adapter_names(model):
            adapters = _existing(f, model, name, cls, config, file_modules)
            expected = _expected(adapters)
            expected.update(_existing_copies(f, model, name, saved_modules))
            _check_slots(f, expected)
            _check_config(f, name, next(iter(adapters.values())), config)
            _check_layers(f, model, file_modules)  # each layer of the kind the file says
            _replace(expected, f.tensors(finite=True))
            return model
        _check_layers(f, model, file_modules)
        wanted = set(file_modules)
        copies, copy_tensors = _new_copies(f, model, saved_modules)
        dry = _dry_run(f, model, cls, config, dtype, name, file_modules)
        if dry is not None:
            _check_slots(f, {**dry, **copy_tensors}, fresh=True)
        tensors = f.tensors(finite=True)
        try:
            injection = plan(model, cls, lambda n, m: n in wanted, name=name, config=config, dtype=dtype)
        except LorazooError as exc:
            raise AdapterFileError(f"{f.where} cannot be applied to this model: {exc}") from exc
        except (RuntimeError, MemoryError) as exc:
            raise AdapterFileError(f"{f.where}: building its adapter failed: {exc}") from exc
        for e in injection.entries:  # the base each layer will have: stored as the file records
            nf4 = getattr(e.host, "nf4", None)
            check_base(f.where, e.path, read_base(f.where, e.path, file_modules[e.path]), nf4 and nf4())
        adapters = {e.path: e.adapter for e in injection.entries}
        try:
            for mpath, adapter in adapters.items():  # per-module shapes (AdaLoRA's ranks)
                adapter.from_file(file_modules[mpath])
        except LorazooError as exc:
            raise AdapterFileError(f"{f.where} cannot be applied to this model: {exc}") from exc
        expected = {**_expected(adapters), **copy_tensors}
        _check_slots(f, expected, fresh=True)
    _fill(expected, tensors)
    if not copies:
        return commit(model, injection)
    return commit(model, injection, extra=lambda undo: trained.install(model, name, copies, undo))


def _copy_keys(mpath: str, twin: nn.Module) -> dict[str, Tensor]:
    return {f"{MODULES}.{mpath}.{k}": t for k, t in trained.state_of(twin).items()}


def _existing_copies(
    f: _Reader, model: nn.Module, name: str, saved: dict[str, list[str]]
) -> dict[str, Tensor]:
    """The model's trained copies of adapter ``name``, keyed as in the file; they must be of the
    modules the file saves."""
    own = trained.copies_of(model, name)
    if set(own) != set(saved):
        raise AdapterFileError(
            f"{f.where} saves whole modules {sorted(saved)} with its adapter, but the model's adapter "
            f"{name!r} carries trained copies of {sorted(own)}; eject it first "
            f"(lorazoo.eject(model, {name!r})) to load the file as saved"
        )
    out: dict[str, Tensor] = {}
    for mpath, twin in own.items():
        out.update(_copy_keys(mpath, twin))
    return out


def _new_copies(
    f: _Reader, model: nn.Module, saved: dict[str, list[str]]
) -> tuple[dict[str, nn.Module], dict[str, Tensor]]:
    """Fresh copies of the modules the file saves whole (not yet in the model), and their
    tensors keyed as in the file (shapes and keys are then checked like the adapter's)."""
    named = dict(model.named_modules())
    copies: dict[str, nn.Module] = {}
    tensors: dict[str, Tensor] = {}
    for mpath, keys in saved.items():
        module = named.get(mpath)
        if module is None:
            raise AdapterFileError(
                f"{f.where} saves the module {_short(mpath)}, which this model does not have"
            )
        try:
            trained.check_copyable(model, mpath, module)
        except LorazooError as exc:
            raise AdapterFileError(f"{f.where} cannot be applied to this model: {exc}") from exc
        twin = trained.fresh_copy(module)
        own = _copy_keys(mpath, twin)
        if sorted(k[len(MODULES) + len(mpath) + 2 :] for k in own) != sorted(keys):
            raise AdapterFileError(
                f"{f.where} saves the module {mpath!r} with tensors {sorted(keys)[:6]}, but this model's "
                f"{mpath!r} ({type(module).__name__}) has {sorted(trained.state_of(twin))[:6]}"
            )
        copies[mpath] = twin
        tensors.update(own)
    return copies, tensors


def _variant_of(f: _Reader) -> type[Variant]:
    try:
        return registry.variant(f.doc["variant"])
    except UnknownVariantError as exc:
        raise UnknownAdapterVariantError(f"{f.where} holds an adapter of {exc}") from exc


def _existing(
    f: _Reader, model: nn.Module, name: str, cls: type[Variant], config: Any, file_modules: dict[str, Any]
) -> dict[str, Variant]:
    """The model's adapter ``name``, checked to take the file's tensors as they are."""
    entries = adapters_named(model, name)
    present = type(entries[0][2]).name
    if present != cls.name:
        raise AdapterFileError(
            f"{f.where} holds a {cls.name!r} adapter, but the model's adapter {name!r} is "
            f"{present!r}; load it under another name"
        )
    merged = [p for p, h, _ in entries if h.merged is not None and name in h.merged.names]
    if merged:
        raise MergeError(
            f"adapter {name!r} is merged into {merged[:4]}{' ...' if len(merged) > 4 else ''}; loading "
            "new tensors into it would leave weights that match neither the old nor the file's "
            "adapter: call lorazoo.unmerge(model) first, then load (and merge again if wanted)"
        )
    have = {p for p, _, _ in entries}
    if have != set(file_modules):
        raise AdapterFileError(_module_mismatch(f.where, set(file_modules), have))
    return {p: a for p, _, a in entries}


def _check_config(f: _Reader, name: str, adapter: Variant, config: Any) -> None:
    """The model's adapter was built with the file's config (tensors mean nothing without it)."""
    ours = adapter.config.to_dict()
    theirs = config.to_dict()
    differ = [k for k in dict.fromkeys([*ours, *theirs]) if ours.get(k) != theirs.get(k)]
    if differ:
        detail = ", ".join(
            f"{k} is {_short(theirs.get(k))} in the file but {_short(ours.get(k))}" for k in differ
        )
        raise AdapterFileError(
            f"{f.where} was saved with another config than the model's adapter {name!r} ({detail}); "
            "its tensors only give the file's outputs with the file's config: eject the adapter "
            f"first (lorazoo.eject(model, {name!r})) to load it as saved, or load it under another name"
        )


def _check_layers(f: _Reader, model: nn.Module, file_modules: dict[str, Any]) -> None:
    named = dict(model.named_modules())
    missing = sorted(set(file_modules) - set(named))
    if missing:
        raise AdapterFileError(_module_mismatch(f.where, set(file_modules), set(), missing=missing))
    for mpath, info in file_modules.items():
        m = named[mpath]
        kind = layer_kind(m)
        shape = layer_dims(m) if kind else (None, None)
        want = info.get("kind", "linear")
        if kind != want or shape != (info["d_out"], info["d_in"]):
            raise AdapterFileError(
                f"{f.where} was made for the {want} layer {mpath!r} of shape "
                f"{info['d_out']}×{info['d_in']} (out × in), but this model's {mpath!r} is "
                f"{type(m).__name__} with shape {shape[0]}×{shape[1]}"
            )


def _meta_twin(module: nn.Module) -> nn.Module:
    """A stand-in for a layer on the meta device: same kind, shape, dtype and bias."""
    d_out, d_in = layer_dims(module)
    dtype = module.weight.dtype
    if layer_kind(module) == "embedding":
        return nn.Embedding(d_in, d_out, device="meta", dtype=dtype)
    has_bias = getattr(module, "bias", None) is not None
    return nn.Linear(d_in, d_out, bias=has_bias, device="meta", dtype=dtype)


def _dry_run(
    f: _Reader,
    model: nn.Module,
    cls: type[Variant],
    config: Any,
    dtype: torch.dtype,
    name: str,
    file_modules: dict[str, Any],
) -> dict[str, Tensor] | None:
    """The tensors the injection would create, built on the meta device (no memory), keyed as
    in the file; None for a variant that cannot be built there (it is checked once built)."""
    named = dict(model.named_modules())
    try:
        if "" in file_modules:
            root = _meta_twin(named[""])
        else:
            root = nn.Module()
            for mpath in sorted(file_modules, key=lambda p: p.count(".")):
                parent = root
                *parents, leaf = mpath.split(".")
                for part in parents:
                    if part not in parent._modules:
                        parent.add_module(part, nn.Module())
                    parent = parent._modules[part]
                parent.add_module(leaf, _meta_twin(named[mpath]))
    except Exception:
        return None
    wanted = set(file_modules)
    try:
        # torch.device as a decorator: the default device is set and restored in torch's own
        # frames, never left at "meta" by an interrupt between lorazoo's lines.
        trial = _on_meta(plan)(root, cls, lambda n, m: n in wanted, name=name, config=config, dtype=dtype)
        for e in trial.entries:  # per-module shapes the file records (AdaLoRA's kept ranks)
            e.adapter.from_file(file_modules[e.path])
    except LorazooError as exc:
        raise AdapterFileError(f"{f.where} cannot be applied to this model: {exc}") from exc
    except Exception:
        return None
    return _expected({e.path: e.adapter for e in trial.entries})


def _on_meta(fn: Any) -> Any:
    """``fn`` run with torch's default device set to meta. Through torch's own decorator where
    it has one, so that the device is set and restored in torch's frames and no lorazoo line runs
    between the two (an interrupt there cannot leave the default device at meta)."""
    try:
        from torch.utils._device import device_decorator as decorate
    except ImportError:  # a torch without it: the plain context manager
        decorate = None
    meta = torch.device("meta")
    if decorate is not None:
        return decorate(meta, fn)

    def run(*args: Any, **kwargs: Any) -> Any:
        with meta:
            return fn(*args, **kwargs)

    return run


def _module_mismatch(
    where: str, in_file: set[str], in_model: set[str], missing: list[str] | None = None
) -> str:
    if missing is not None:
        return f"{where} adapts modules this model does not have: {[_short(m) for m in missing[:8]]}" + (
            " ..." if len(missing) > 8 else ""
        )
    only_file = [_short(m) for m in sorted(in_file - in_model)[:6]]
    only_model = sorted(in_model - in_file)[:6]
    return (
        f"{where} adapts other modules than the model's adapter: only in the file "
        f"{only_file}, only in the model {only_model}"
    )


def _expected(adapters: dict[str, Variant]) -> dict[str, Tensor]:
    """Every tensor a file must hold for ``adapters``, under its key in the file."""
    expected: dict[str, Tensor] = {}
    for mpath, adapter in adapters.items():
        for key, t in _layer_tensors(adapter).items():
            expected[f"{mpath}.{key}"] = t
    first = next(iter(adapters.values()))
    for key, t in _shared_tensors(first).items():
        expected[f"{SHARED}.{key}"] = t
    return expected


def _check_slots(f: _Reader, expected: dict[str, Tensor], fresh: bool = False) -> None:
    """The file's header lists exactly the ``expected`` tensors, each of the expected shape.
    ``fresh``: ``expected`` comes from the file's own config and the model's layer shapes."""
    missing = sorted(set(expected) - set(f.slots))
    extra = sorted(set(f.slots) - set(expected))
    if missing or extra:
        raise AdapterFileError(
            f"{f.where} does not fit this adapter: tensors missing from the file "
            f"{missing[:6]}, unexpected tensors in the file {[_short(k) for k in extra[:6]]}"
        )
    for key, t in expected.items():
        shape = f.slots[key].shape
        if shape != tuple(t.shape):
            if fresh:
                raise AdapterFileError(
                    f"{f.where}: tensor {key!r} has shape {shape}, but the file's own config and this "
                    f"model's layer shapes call for {tuple(t.shape)} (a damaged header, or made for "
                    "another model?)"
                )
            raise AdapterFileError(
                f"{f.where}: tensor {key!r} has shape {shape} in the file but "
                f"{tuple(t.shape)} in the model (made for another rank or layer shape?)"
            )


@torch.no_grad()  # as a decorator, so grad mode is restored in torch's frames
def _fill(expected: dict[str, Tensor], tensors: dict[str, Tensor]) -> None:
    """Copy the file's tensors into adapters not yet in the model."""
    for key, t in expected.items():
        t.copy_(tensors[key])


@torch.no_grad()
def _replace(expected: dict[str, Tensor], tensors: dict[str, Tensor]) -> None:
    """Copy the file's tensors into the adapter's, all or none (also under KeyboardInterrupt).
    A sharded tensor (FSDP2) takes its own rows of the file's whole tensor."""
    staged = {k: tensors[k].to(device=t.device, dtype=t.dtype) for k, t in expected.items()}
    backup = {k: t.detach().clone() for k, t in expected.items()}
    try:
        for key, t in expected.items():
            copy_into(t, staged[key])
    except BaseException:
        for key, t in expected.items():
            t.copy_(backup[key])
        raise


# ---- the base an adapter was trained on (quantised bases) ---------------------------------------
#
# A module's entry in the adapter document may carry ``"base"``, describing how that layer's frozen
# weight was stored when the adapter was trained (written for layers whose base is not dense):
#
#     {"storage": "nf4", "quant_type": "nf4", "block_size": 64, "double_quant": true,
#      "dtype": "torch.bfloat16", "fingerprint": "<32 hex digits>"}
#
# ``dtype`` is the dtype the weight was quantised from (what dequantisation returns);
# ``fingerprint`` (optional) is a BLAKE2b-128 digest of every stored tensor of the layer (codes,
# scales, second-level scales, offset), with their dtypes and shapes and the weight's shape, so a
# load can tell whether the base it lands on holds the very bytes the adapter was trained on.

BASE_KEY = "base"
_BASE_FIELDS: dict[str, type] = {
    "storage": str,
    "quant_type": str,
    "block_size": int,
    "double_quant": bool,
    "dtype": str,
}


def nf4_fingerprint(q: Any) -> str:
    """A BLAKE2b-128 digest (32 hex digits) of an NF4 weight's stored bytes, shapes and dtypes:
    equal fingerprints mean byte-identical storage. Costs one read of the packed bytes (about a
    quarter of the dense weight)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(q.shape), str(q.dtype))).encode())
    for name, t in q.tensors().items():
        t = t.detach().to("cpu").contiguous()
        h.update(repr((name, str(t.dtype), tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def record_base(q: Any, *, fingerprint: bool = True) -> dict[str, Any]:
    """The ``"base"`` entry for one layer whose weight is the NF4 storage ``q``
    (a :class:`lorazoo.quant.NF4Weight`); ``fingerprint=False`` leaves out the digest."""
    from .quant.nf4 import BLOCK

    out: dict[str, Any] = {
        "storage": "nf4",
        "quant_type": "nf4",
        "block_size": BLOCK,
        "double_quant": bool(q.double_quant),
        "dtype": str(q.dtype),
    }
    if fingerprint:
        out["fingerprint"] = nf4_fingerprint(q)
    return out


def read_base(where: str, path: str, info: Any) -> dict[str, Any] | None:
    """The validated ``"base"`` entry of module ``path`` in a file's document (``info`` is the
    module's entry), or None when the file records none (a dense base). A malformed entry is an
    :class:`AdapterFileError` naming the field."""
    if not isinstance(info, dict) or info.get(BASE_KEY) is None:
        return None
    base = info[BASE_KEY]
    what = f"{where} has a damaged adapter header: module {_short(path)}"
    if not isinstance(base, dict):
        raise AdapterFileError(f"{what}: 'base' must be a JSON object, got {_short(base)}")
    for key, kind in _BASE_FIELDS.items():
        value = base.get(key)
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not ok:
            raise AdapterFileError(
                f"{what}: base field {key!r} must be a JSON {kind.__name__}, got {_short(value)}"
            )
    fp = base.get("fingerprint")
    if fp is not None and not (
        isinstance(fp, str) and len(fp) == 32 and all(c in "0123456789abcdef" for c in fp)
    ):
        raise AdapterFileError(f"{what}: base field 'fingerprint' must be 32 hex digits, got {_short(fp)}")
    unknown = sorted(set(base) - set(_BASE_FIELDS) - {"fingerprint"})
    if unknown:
        raise AdapterFileError(
            f"{what}: unknown base field {_short(unknown[0])}; this lorazoo reads "
            f"{', '.join([*_BASE_FIELDS, 'fingerprint'])}"
        )
    if base["dtype"] not in _DTYPES:
        raise AdapterFileError(
            f"{what}: base dtype {_short(base['dtype'])} is not one of {', '.join(_DTYPES)}"
        )
    return dict(base)


def check_base(where: str, path: str, recorded: dict[str, Any] | None, q: Any | None) -> None:
    """Check that layer ``path`` of the model a file is loaded onto is stored as the file says.

    ``recorded`` is :func:`read_base`'s result; ``q`` is the layer's NF4 storage (an
    :class:`~lorazoo.quant.NF4Weight`) or None for a dense layer. A file that records no base
    fits any layer. Otherwise the storage, then each recipe field (``quant_type``,
    ``block_size``, ``double_quant``, ``dtype``), then the fingerprint (when recorded) must
    match; the :class:`AdapterFileError` names the first field that differs, both values, and
    what would fit."""
    if recorded is None:
        return
    if q is None:
        raise AdapterFileError(
            f"{where} was trained on layer {path!r} stored as {recorded['storage']} (quant_type="
            f"{recorded['quant_type']}, block_size={recorded['block_size']}, double_quant="
            f"{recorded['double_quant']}), but this model's {path!r} is dense: quantise it with that "
            "recipe first (lorazoo.quantize(model, double_quant=...)) so the adapter sees the base it "
            "was trained on"
        )
    ours = record_base(q, fingerprint="fingerprint" in recorded)
    for key in (*_BASE_FIELDS, "fingerprint"):
        if key in recorded and recorded[key] != ours[key]:
            if key == "fingerprint":
                raise AdapterFileError(
                    f"{where} was trained on other NF4 bytes for layer {path!r} (base fingerprint "
                    f"{recorded[key]} in the file, {ours[key]} in this model) although the recipe "
                    "matches: the base weights differ (another checkpoint, or quantised from another "
                    "dtype); load the adapter onto the base it was trained on"
                )
            raise AdapterFileError(
                f"{where} was trained on layer {path!r} stored with {key}={_short(recorded[key])}, but "
                f"this model's {path!r} has {key}={_short(ours[key])}; re-quantise the base with "
                f"{key}={_short(recorded[key])} from its full-precision weights"
            )
