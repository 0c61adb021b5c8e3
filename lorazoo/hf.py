"""Hugging Face round trips: the base's own state dict, a plain merged model, a merged folder.

* :func:`sync_save_keys` (run by the engine after every change of adapters or copies) keeps a
  transformers model's ``_keys_to_ignore_on_save`` listing lorazoo's tensors, so a plain
  ``save_pretrained`` of an adapted, unmerged model writes the base only.
* :func:`base_state_dict` is an adapted model's state dict without lorazoo's tensors: the keys
  and tensors of the base model as it was loaded, for any model.
* :func:`merge_and_unload` folds the active adapters into the weights and puts the original
  module objects back: a plain model with no lorazoo state, ready for ``save_pretrained`` or
  serving.
* :func:`merge_folder` does both on folders (``lorazoo merge``).

transformers is needed only by :func:`merge_folder`, and imported there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn

from . import trained
from .engine import _interrupt
from .engine.distributed import refuse_sharded
from .engine.inject import _FROZEN, _set_child, _set_grad, _transaction, adapter_names, hosts
from .engine.merge import refuse_ties
from .errors import LorazooError, MergeError


def _lorazoo_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict key prefixes of every tensor lorazoo added to ``model``."""
    out = [f"{p}.adapters." if p else "adapters." for p, _ in hosts(model)]
    out += [f"{p}.{trained.COPIES}." for p, _ in trained.wrappers(model)]
    return tuple(out)


_IGNORE = "_keys_to_ignore_on_save"  # transformers: state-dict keys save_pretrained leaves out
_OURS = "_lorazoo_save_keys"  # model attribute: the keys lorazoo added to that set


def lorazoo_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of every tensor lorazoo added to ``model`` (adapters, trained copies)."""
    keys = {
        f"{p}.adapters.{k}" if p else f"adapters.{k}"
        for p, h in hosts(model)
        for k in h.adapters.state_dict()
    }
    for p, w in trained.wrappers(model):
        keys |= {f"{p}.{trained.COPIES}.{k}" for k in w.copies.state_dict()}
    return keys


def sync_save_keys(model: nn.Module) -> None:
    """Keep a transformers model's ``_keys_to_ignore_on_save`` listing exactly the tensors lorazoo
    added, beside the model's own entries, so that ``save_pretrained`` writes the base's keys
    only. Called by the engine after every change of adapters or copies; a model without that
    attribute (not a transformers model) is left alone."""
    if not hasattr(model, _IGNORE):
        return
    before = model.__dict__.get(_OURS, set())
    ours = lorazoo_keys(model)
    if not ours and not before:
        return
    own = {k for k in (getattr(model, _IGNORE) or ()) if k not in before}
    model.__dict__.update({_IGNORE: own | ours, _OURS: ours})


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of the base model inside an adapted ``model``: every key and tensor the
    model had before lorazoo touched it, and nothing else (no adapter tensors, no trained module
    copies). The tensors are the model's own (as ``state_dict()`` gives them), not copies.

    For a Hugging Face model, ``model.save_pretrained(folder, state_dict=lorazoo.base_state_dict(model))``
    writes the base, loadable with ``from_pretrained`` without unexpected keys (as a plain
    ``save_pretrained`` does, through :func:`sync_save_keys`).

    Refused (:class:`~lorazoo.MergeError`) while adapters are merged or a variant has rewritten a
    base weight (OLoRA): the weights are then not the base's. Unmerge first, or eject the
    rewriting adapter; for the adapted model as one plain model use :func:`merge_and_unload`.
    """
    for path, host in hosts(model):
        if host.merged is not None:
            raise MergeError(
                f"adapters {list(host.merged.names)} are merged into {path!r}, so its weight is not the "
                "base's: call lorazoo.unmerge(model) first (or lorazoo.merge_and_unload(model) to save "
                "the merged model instead)"
            )
        if host.patches:
            owners = sorted({p.owner for p in host.patches})
            raise MergeError(
                f"adapter(s) {owners} rewrote the base weight of {path!r}; the original comes back when "
                "they are ejected (lorazoo.eject), or save the adapted model with "
                "lorazoo.merge_and_unload(model)"
            )
    prefixes = _lorazoo_prefixes(model)
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the weights and remove every trace of lorazoo: each adapted
    layer becomes its original module object again (holding the merged weight), each module
    saved whole with an adapter (:func:`lorazoo.modules_to_save`) becomes the active adapter's
    trained copy (a module of the original's class), or the original when no active adapter has
    one. Inactive adapters are dropped. Parameters get back the ``requires_grad`` they had before
    the first injection. The model cannot be unmerged afterwards.

    Layers already merged with their active adapters are kept as they are. Refused before
    anything changes: two active adapters with copies of one module (which to keep would be a
    guess), base rewrites of an inactive adapter (eject it first), a layer merged with another
    set than its active adapters, and the merge's own refusals (a weight tied to another layer).
    All or nothing, also when interrupted. Returns ``model``, in place.
    """
    if not adapter_names(model):
        raise LorazooError("the model has no lorazoo adapters to merge and unload")
    refuse_sharded(model, "unload adapters from", "merge and unload before calling fully_shard")
    picks = {path: w.running() for path, w in trained.wrappers(model)}  # refuses ambiguity
    todo = []
    for path, host in hosts(model):
        active = [n for n in host.active if n in host.adapters]
        stray = sorted({p.owner for p in host.patches} - set(active))
        if stray:
            raise MergeError(
                f"inactive adapter(s) {stray} rewrote the base weight of {path!r}; merging the active "
                f"ones would keep that rewrite in the weights: eject {stray} first"
            )
        if host.merged is not None:
            if set(host.merged.names) != set(active):
                raise MergeError(
                    f"{path!r} has {list(host.merged.names)} merged but {active} active; "
                    "call lorazoo.unmerge(model) first"
                )
        elif active:
            todo.append((path, host, active))
    refuse_ties(model, [(p, h) for p, h, _ in todo], "merging into it")

    def body(undo: list[Callable[[], None]]) -> None:
        for _, host, active in todo:
            _interrupt.checkpoint()
            undo.append(lambda h=host: h.unmerge(interruptible=False) if h.merged is not None else None)
            host.merge(active)
        for path, host in hosts(model):
            _interrupt.checkpoint()
            original = host.original
            held = [(table, k, table[k]) for table, k in host.base_tensor_slots()]
            undo.append(lambda held=held: [table.__setitem__(k, t) for table, k, t in held])
            undo.append(lambda path=path, h=host: _set_child(model, path, h))
            host.hand_back()  # the kind knows its tensors (a Conv1D's weight is stored transposed)
            _set_child(model, path, original)
        for path, wrapper in trained.wrappers(model):
            _interrupt.checkpoint()
            pick = picks[path]
            undo.append(lambda path=path, w=wrapper: _set_child(model, path, w))
            if pick is not None:
                _set_child(model, path, wrapper.copies[pick])
                continue
            original = wrapper.original
            held = {
                "_parameters": dict(original._parameters),
                "_buffers": dict(original._buffers),
                "_modules": dict(original._modules),
            }
            undo.append(lambda w=wrapper, h=held: trained._give_back_undo(w, h))
            _set_child(model, path, wrapper.give_back())
        _interrupt.checkpoint()
        flags = model.__dict__.pop(_FROZEN, {})
        for n, t in model.named_parameters():
            if n in flags:
                _set_grad(t, flags[n])

    _transaction(model, body)
    return model


# --------------------------------------------------------------------------------------------
# Folders (lorazoo merge)
# --------------------------------------------------------------------------------------------

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise LorazooError(
            "merging a Hugging Face model folder needs the transformers package, which is not "
            "installed: pip install transformers"
        ) from exc
    return transformers


def _model_class(transformers, folder: Path):
    config = transformers.AutoConfig.from_pretrained(folder)
    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def merge_folder(
    model_dir: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    name: str = "default",
) -> Path:
    """Load the Hugging Face model in ``model_dir``, apply ``adapter`` (a lorazoo file or a PEFT
    folder), :func:`merge_and_unload` it and write the merged model to the new folder ``out``
    with ``save_pretrained``, beside the other files of ``model_dir`` (tokenizer, ...). ``out``
    must not exist or be empty. The folder is written under a temporary name beside ``out`` and
    renamed into place when complete. Needs transformers."""
    from .io import load

    transformers = _transformers()
    src = Path(model_dir)
    target = Path(out)
    if not (src / "config.json").is_file():
        raise LorazooError(f"{str(src)!r} is not a Hugging Face model folder (no config.json)")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise LorazooError(f"{str(target)!r} exists and is not an empty folder; choose a new folder")
    try:
        cls = _model_class(transformers, src)
        model = cls.from_pretrained(src, dtype="auto")
    except Exception as exc:  # transformers and safetensors raise many kinds
        raise LorazooError(
            f"transformers could not load the model in {str(src)!r}: {type(exc).__name__}: {exc}"
        ) from exc
    load(model, adapter, name=name)
    merge_and_unload(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        for item in src.iterdir():  # tokenizer and other files the weights do not replace
            if item.is_file() and not (tmp / item.name).exists() and not item.name.endswith(_WEIGHT_SUFFIXES):
                if item.name.endswith(".index.json"):
                    continue
                shutil.copy2(item, tmp / item.name)
        if target.exists():
            target.rmdir()  # empty, checked above
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    return target
