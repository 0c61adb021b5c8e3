"""Adapter files: one ``.safetensors`` file per adapter, holding only adapter tensors.

The safetensors header metadata carries ``lorazoo.format`` (``"lorazoo-adapter"``),
``lorazoo.format_version`` and ``lorazoo.adapter``, a JSON document with the variant name, its
config, the adapter dtype and, per adapted module, its path and shape. Tensor keys are
``<module path>.<tensor name>``; state shared by all layers of the adapter (VeRA's projections,
when stored) is kept once under ``__shared__.<tensor name>``.

Writes go to a temporary file in the same folder that is renamed over the target only when
complete, so an interrupted save never leaves a half-written adapter. Loads validate everything
before touching the model.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from . import __version__, peft_format, registry
from .engine.distributed import accepts_wrapped, copy_into, full_tensor
from .engine.inject import adapter_names, adapters_named, commit, plan
from .engine.layer import layer_dims, layer_kind
from .errors import AdapterFileError, LorazooError
from .variant import Variant

FORMAT = "lorazoo-adapter"
FORMAT_VERSION = 1
SHARED = "__shared__"

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
    for key, t in _shared_tensors(entries[0][2]).items():
        tensors[f"{SHARED}.{key}"] = t.detach().to("cpu").contiguous()
    doc = {
        "name": name,
        "variant": cls.name,
        "plugin": registry.plugin_of(cls.name) if cls.name in registry.variants() else None,
        "config": config.to_dict(),
        "dtype": str(_dtype_of(entries[0][2])),
        "modules": modules,
        "lorazoo_version": __version__,
    }
    meta = {
        "lorazoo.format": FORMAT,
        "lorazoo.format_version": str(FORMAT_VERSION),
        "lorazoo.adapter": json.dumps(doc, sort_keys=True),
    }
    blob = st_save(tensors, metadata=meta)
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


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The adapter document and tensors of a file, validated for format (not for a model)."""
    p = Path(path)
    try:
        blob = p.read_bytes()
    except OSError as exc:
        raise AdapterFileError(f"cannot read adapter file {str(p)!r}: {exc}") from exc
    try:
        tensors = st_load(blob)
        meta = _header_metadata(blob)
    except Exception as exc:
        raise AdapterFileError(
            f"{str(p)!r} is not a readable safetensors file (corrupt or truncated: {exc})"
        ) from exc
    if meta.get("lorazoo.format") != FORMAT:
        raise AdapterFileError(
            f"{str(p)!r} is a safetensors file but not a lorazoo adapter (no 'lorazoo.format' "
            "header); for a PEFT adapter, load its folder"
        )
    version = meta.get("lorazoo.format_version", "?")
    if version != str(FORMAT_VERSION):
        raise AdapterFileError(
            f"{str(p)!r} has adapter format version {version}; this lorazoo reads version "
            f"{FORMAT_VERSION}: upgrade lorazoo"
        )
    try:
        doc = json.loads(meta["lorazoo.adapter"])
        for key in ("variant", "config", "dtype", "modules"):
            doc[key]  # noqa: B018 - presence check
    except (KeyError, ValueError, TypeError) as exc:
        raise AdapterFileError(f"{str(p)!r} has a damaged adapter header: {exc}") from exc
    return doc, tensors


def _header_metadata(blob: bytes) -> dict[str, str]:
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    return header.get("__metadata__", {}) or {}


@accepts_wrapped
def load(model: nn.Module, path: str | os.PathLike, name: str = "default") -> nn.Module:
    """Load an adapter file into ``model`` as adapter ``name``.

    If the model has no adapter ``name`` yet, it is injected with the file's variant, config and
    modules. Variant, modules and every tensor shape are checked first; on any mismatch, or a
    corrupt or truncated file, :class:`AdapterFileError` is raised and the model is unchanged.
    Returns ``model``.
    """
    # A PEFT folder (or a pickle, to refuse) is read by lorazoo.peft_format.
    doc, tensors = peft_format.read_peft(path, model) if peft_format.handles(path) else read(path)
    cls = registry.variant(doc["variant"])
    try:
        config = cls.config_class.from_kwargs(**doc["config"])
    except LorazooError as exc:
        raise AdapterFileError(f"{str(path)!r}: its config does not fit variant {cls.name!r}: {exc}") from exc
    file_modules: dict[str, Any] = doc["modules"]
    dtype = _DTYPES.get(doc["dtype"])
    if dtype is None:
        raise AdapterFileError(f"{str(path)!r}: unsupported adapter dtype {doc['dtype']!r}")

    existing = adapter_names(model)
    if name in existing:
        entries = adapters_named(model, name)
        if existing[name] != cls.name:
            raise AdapterFileError(
                f"{str(path)!r} holds a {cls.name!r} adapter, but the model's adapter {name!r} is "
                f"{existing[name]!r}; load it under another name"
            )
        have = {p for p, _, _ in entries}
        if have != set(file_modules):
            raise AdapterFileError(_module_mismatch(path, set(file_modules), have))
        adapters = {p: a for p, _, a in entries}
        _check_and_copy(path, tensors, adapters, dry_run=True)
        _check_and_copy(path, tensors, adapters, dry_run=False)
        return model

    wanted = set(file_modules)
    named = dict(model.named_modules())
    missing = sorted(wanted - set(named))
    if missing:
        raise AdapterFileError(_module_mismatch(path, wanted, set(), missing=missing))
    for mpath, info in file_modules.items():
        m = named[mpath]
        kind = layer_kind(m)
        shape = layer_dims(m) if kind else (None, None)
        want = info.get("kind", "linear")
        if kind != want or shape != (info["d_out"], info["d_in"]):
            raise AdapterFileError(
                f"{str(path)!r} was made for the {want} layer {mpath!r} of shape "
                f"{info['d_out']}×{info['d_in']} (out × in), but this model's {mpath!r} is "
                f"{type(m).__name__} with shape {shape[0]}×{shape[1]}"
            )
    try:
        injection = plan(model, cls, lambda n, m: n in wanted, name=name, config=config, dtype=dtype)
    except LorazooError as exc:
        raise AdapterFileError(f"{str(path)!r} cannot be applied to this model: {exc}") from exc
    adapters = {e.path: e.adapter for e in injection.entries}
    _check_and_copy(path, tensors, adapters, dry_run=True)
    _check_and_copy(path, tensors, adapters, dry_run=False)
    return commit(model, injection)


def _module_mismatch(
    path: Any, in_file: set[str], in_model: set[str], missing: list[str] | None = None
) -> str:
    if missing is not None:
        return f"{str(path)!r} adapts modules this model does not have: {missing[:8]}" + (
            " ..." if len(missing) > 8 else ""
        )
    only_file = sorted(in_file - in_model)[:6]
    only_model = sorted(in_model - in_file)[:6]
    return (
        f"{str(path)!r} adapts other modules than the model's adapter: only in the file "
        f"{only_file}, only in the model {only_model}"
    )


@torch.no_grad()
def _check_and_copy(
    path: Any, tensors: dict[str, Tensor], adapters: dict[str, Variant], dry_run: bool
) -> None:
    expected: dict[str, Tensor] = {}
    for mpath, adapter in adapters.items():
        for key, t in _layer_tensors(adapter).items():
            expected[f"{mpath}.{key}"] = t
    first = next(iter(adapters.values()))
    for key, t in _shared_tensors(first).items():
        expected[f"{SHARED}.{key}"] = t
    if dry_run:
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise AdapterFileError(
                f"{str(path)!r} does not fit this adapter: tensors missing from the file "
                f"{missing[:6]}, unexpected tensors in the file {extra[:6]}"
            )
        for key, t in expected.items():
            got = tensors[key]
            if tuple(got.shape) != tuple(t.shape):
                raise AdapterFileError(
                    f"{str(path)!r}: tensor {key!r} has shape {tuple(got.shape)} in the file but "
                    f"{tuple(t.shape)} in the model (made for another rank or layer shape?)"
                )
            if not got.is_floating_point():
                raise AdapterFileError(f"{str(path)!r}: tensor {key!r} is not floating point")
        return
    for key, t in expected.items():
        copy_into(t, tensors[key])  # a sharded tensor takes its own rows
