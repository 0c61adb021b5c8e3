"""PEFT adapter folders: read them into lorazoo, write lorazoo adapters as them.

A PEFT adapter folder holds ``adapter_config.json`` (the method and its settings) and
``adapter_model.safetensors`` (the tensors, keyed ``base_model.model.<module path>.<name>``).
The mapping onto lorazoo (see ``docs/peft.md``):

==============================  ==================================  ==========================
PEFT                            lorazoo tensor                      notes
==============================  ==================================  ==========================
``<p>.lora_A.weight``           ``<p>.lora_A`` (``r × d_in``)       linear layers
``<p>.lora_B.weight``           ``<p>.lora_B`` (``d_out × r``)
``<p>.lora_embedding_A``        ``<p>.lora_A`` (``r × vocab``)      embedding layers
``<p>.lora_embedding_B``        ``<p>.lora_B`` (``dim × r``)
``<p>.lora_magnitude_vector``   ``<p>.lora_magnitude_vector``       DoRA's ``m``, one per row
``<p>.lora_A``/``_E``/``_B``    same names                          AdaLoRA: ``k × d_in``,
                                                                    ``k × 1``, ``d_out × k``
``<p>.vera_lambda_b`` / ``_d``  same names                          VeRA's trained vectors
``base_model.vera_A`` / ``_B``  ``__shared__.vera_A`` / ``_B``      VeRA's projections
``<m>.<key>``                   ``__modules__.<m>.<key>``           ``modules_to_save``
==============================  ==================================  ==========================

``peft_type: LORA`` becomes ``lora``, ``rslora`` (``use_rslora``) or ``dora`` (``use_dora``);
``VERA`` becomes ``vera``; ``ADALORA`` becomes ``adalora`` (the plugin's variant), each layer at
the rank its tensors have (cut by PEFT's ``rank_pattern`` after the final mask). The scale is
PEFT's: ``lora_alpha / r`` (``/ √r`` with rsLoRA), ``lora_alpha / (init_r + 1e-5)`` for AdaLoRA;
VeRA has none. transformers' ``Conv1D`` layers (``fan_in_fan_out``) hold factors in the same
linear layout, so they map like ``nn.Linear``. The module paths and ranks come from the tensors;
the per-module rank and alpha LoRA allows (``rank_pattern``, ``alpha_pattern``) must come out
the same for every module, because one lorazoo adapter has one config. Settings lorazoo cannot
honour are refused by name rather than dropped: ``bias``, base-rewriting initialisations
(``init_lora_weights="olora"``, ``"pissa"``, ...) and PEFT-only features. Pickled ``.bin``
weights are refused without being opened.

Nothing here imports PEFT: the reader works on the files alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from .errors import AdapterFileError, LorazooError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PREFIX = "base_model.model."
SHARED = "__shared__"
MODULES = "__modules__"  # lorazoo's key prefix of whole trained modules (modules_to_save)
PEFT_VERSION = "0.21.2"  # the PEFT release the files written here are checked against

# Variants whose files PEFT can express, and how (see save_peft).
EXPORTABLE = ("lora", "rslora", "loraplus", "dora", "olora", "vera", "adalora")

# LoRA initialisations that leave the base weights alone; every other one rewrites them.
_PLAIN_INITS = (True, False, "gaussian")
# PEFT options that change the computation in a way lorazoo does not reproduce; a set value is
# refused with the option's name.
_FEATURES = (
    "lora_bias",
    "use_qalora",
    "use_bdlora",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "arrow_config",
    "megatron_config",
    "monteclora_config",
    "velora_config",
    "kasa_config",
)


# --------------------------------------------------------------------------------------------
# Recognising and opening a PEFT adapter
# --------------------------------------------------------------------------------------------


def handles(path: str | os.PathLike) -> bool:
    """True for a path :func:`read_peft` answers: a folder, a pickle file (to refuse it), or
    the ``adapter_model.safetensors`` of a PEFT folder."""
    p = Path(path)
    if p.is_dir() or p.suffix.lower() in PICKLE_SUFFIXES:
        return True
    return p.name == WEIGHTS_NAME and (p.parent / CONFIG_NAME).is_file()


def _folder(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES and not p.is_dir():
        raise AdapterFileError(
            f"{str(p)!r} is a pickle file; lorazoo never unpickles (loading a pickle can run "
            "arbitrary code). Re-save the adapter as safetensors (PEFT: save_pretrained(..., "
            "safe_serialization=True)) and load the folder"
        )
    return p if p.is_dir() else p.parent


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``adapter_config.json`` of a PEFT folder, as a dict (refusing a damaged one)."""
    folder = _folder(path)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterFileError(
            f"{str(folder)!r} is a folder without {CONFIG_NAME}, so it is not a PEFT adapter folder; "
            "a lorazoo adapter is a single .safetensors file"
        )
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdapterFileError(f"{str(cfg_path)!r} is not readable JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise AdapterFileError(f"{str(cfg_path)!r} holds a JSON {type(cfg).__name__}, not an object")
    return cfg


def read_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a PEFT folder's ``adapter_model.safetensors`` (never a pickle)."""
    folder = _folder(path)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickles = sorted(q.name for q in folder.iterdir() if q.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterFileError(
                f"{str(folder)!r} holds its tensors as pickle ({', '.join(pickles)}), which lorazoo "
                f"never unpickles; re-save the adapter with safe_serialization=True to get {WEIGHTS_NAME}"
            )
        raise AdapterFileError(f"{str(folder)!r} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    try:
        return st_load(weights.read_bytes())
    except Exception as exc:
        raise AdapterFileError(
            f"{str(weights)!r} is not a readable safetensors file (corrupt or truncated: {exc})"
        ) from exc


# --------------------------------------------------------------------------------------------
# PEFT -> lorazoo
# --------------------------------------------------------------------------------------------


def _refuse_unsupported(where: str, cfg: dict[str, Any]) -> None:
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise AdapterFileError(
            f"{where}: bias={bias!r} trains the base layers' biases, which a lorazoo adapter does not "
            "hold; only PEFT adapters with bias='none' are read"
        )
    # fan_in_fan_out=true (transformers' Conv1D, which stores its weight in × out) changes only
    # how PEFT adds the update to the stored weight: the tensors are in the linear layout either
    # way, as lorazoo's are on a Conv1D (whose weight variants see as out × in). PEFT itself sets
    # the flag per layer to what the layer is, so its value is not needed here.
    for key in _FEATURES:
        value = cfg.get(key)
        if value not in (None, False, {}, [], "", 0):
            raise AdapterFileError(
                f"{where}: {key}={value!r} is a PEFT feature lorazoo does not reproduce; only "
                "adapters without it are read"
            )


def _strip(key: str) -> str:
    return key[len(PREFIX) :] if key.startswith(PREFIX) else key


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's per-module override: the first pattern ``k`` with ``(.*\\.)?(k)$`` matching."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _uniform(where: str, what: str, per_module: dict[str, Any], default: Any) -> Any:
    """The one value every module has; the config's own value is the reference when some module
    has it, so the error names the module a pattern moved away from it."""
    paths = sorted(per_module)
    ref_path = next((p for p in paths if per_module[p] == default), paths[0])
    ref = per_module[ref_path]
    for path in paths:
        if per_module[path] != ref:
            raise AdapterFileError(
                f"{where}: module {path!r} has {what}={per_module[path]} but {ref_path!r} has "
                f"{what}={ref}; one lorazoo adapter has one config, so a PEFT adapter whose "
                "rank_pattern/alpha_pattern gives modules different values is not read (split it "
                "into one adapter per value)"
            )
    return ref


def _lora_doc(where: str, cfg: dict[str, Any], raw: dict[str, Tensor]) -> tuple[dict, dict]:
    init = cfg.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise AdapterFileError(
            f"{where}: init_lora_weights={init!r} rewrites the base weights, and the file's tensors "
            "are relative to that rewritten base, which this folder does not hold; convert it to a "
            "plain LoRA first (PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    dora = bool(cfg.get("use_dora"))
    rslora = bool(cfg.get("use_rslora"))
    parts = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "eA", "lora_embedding_B": "eB"}
    parts["lora_magnitude_vector"] = "m"
    found: dict[str, dict[str, Tensor]] = {}
    for key, t in raw.items():
        path, part = _split(where, _strip(key), parts)
        found.setdefault(path, {})[parts[part]] = t
    if not found:
        raise AdapterFileError(f"{where}: the folder holds no LoRA tensors")
    tensors: dict[str, Tensor] = {}
    modules: dict[str, Any] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path, t in found.items():
        embedding = "eA" in t or "eB" in t
        a, b = (t.get("eA"), t.get("eB")) if embedding else (t.get("A"), t.get("B"))
        if a is None or b is None or (embedding and ("A" in t or "B" in t)):
            raise AdapterFileError(f"{where}: module {path!r} lacks one of its LoRA factors A, B")
        conv = not embedding and a.dim() > 2
        if conv:
            a, b, t = _conv_from_peft(where, path, a, b, t)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterFileError(
                f"{where}: module {path!r} has factors of shapes {tuple(a.shape)} and {tuple(b.shape)}; "
                "lorazoo reads factors A (r × d_in) and B (d_out × r), or for a convolution A "
                "(r × in × k…) and B (out × r × 1…)"
            )
        if dora != ("m" in t):
            raise AdapterFileError(
                f"{where}: module {path!r} {'lacks' if dora else 'has'} lora_magnitude_vector but "
                f"use_dora is {str(dora).lower()}"
            )
        tensors[f"{path}.lora_A"] = a
        tensors[f"{path}.lora_B"] = b
        if dora:
            tensors[f"{path}.lora_magnitude_vector"] = t["m"]
        modules[path] = {"d_out": int(b.shape[0]), "d_in": int(a.shape[1])}
        modules[path]["kind"] = "embedding" if embedding else ("conv" if conv else "linear")
        ranks[path] = int(a.shape[0])
        alphas[path] = _pattern_value(cfg.get("alpha_pattern") or {}, path, cfg.get("lora_alpha", 8))
    r = _uniform(where, "r", ranks, cfg.get("r"))
    alpha = _uniform(where, "lora_alpha", alphas, cfg.get("lora_alpha", 8))
    config: dict[str, Any] = {"r": r, "alpha": float(alpha), "dropout": float(cfg.get("lora_dropout", 0.0))}
    if dora:
        variant = "dora"
        config["rslora"] = rslora
    else:
        variant = "rslora" if rslora else "lora"
    return {"variant": variant, "config": config, "modules": modules}, tensors


def _conv_from_peft(
    where: str, path: str, a: Tensor, b: Tensor, t: dict[str, Tensor]
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """PEFT's conv LoRA factors (``A`` ``r × in × k…``, ``B`` ``out × r × 1…``, DoRA's magnitude
    ``1 × out × 1…``) in lorazoo's flattened layout (``r × in·k…``, ``out × r``, ``out``)."""
    if b.dim() != a.dim() or any(s != 1 for s in b.shape[2:]):
        raise AdapterFileError(
            f"{where}: module {path!r} has a convolution factor A of shape {tuple(a.shape)} but B of "
            f"shape {tuple(b.shape)}; lorazoo reads conv LoRA with B a 1×1 convolution (out × r × 1…)"
        )
    t = dict(t)
    if "m" in t:
        m = t["m"]
        if m.numel() != b.shape[0] or (m.dim() > 1 and m.shape[1] != b.shape[0]):
            raise AdapterFileError(
                f"{where}: module {path!r} has a DoRA magnitude of shape {tuple(m.shape)}; a convolution "
                f"with {b.shape[0]} output channels has 1 × {b.shape[0]} × 1…"
            )
        t["m"] = m.reshape(-1)
    return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], b.shape[1]), t


def _conv_to_peft(out: dict[str, Tensor], modules: dict[str, Any]) -> None:
    """Reshape, in place, the PEFT tensors of every ``"conv"`` module of ``modules`` to PEFT's
    conv layout; each needs its ``weight_shape`` (``out × in × k…``, what a model's layer
    says and a lorazoo file does not record)."""
    for p, info in modules.items():
        if info.get("kind") != "conv":
            continue
        shape = info.get("weight_shape")
        if shape is None:
            raise LorazooError(
                f"the convolution {p!r} needs its kernel shape for PEFT's conv layout, which a lorazoo "
                "file does not record: load the adapter into its model and use "
                "lorazoo.save(model, folder, format='peft')"
            )
        ones = (1,) * (len(shape) - 2)
        for key in (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"):
            k = PREFIX + p + key
            if k not in out:
                continue
            t = out[k]
            if key == ".lora_A.weight":
                out[k] = t.reshape(t.shape[0], *shape[1:]).contiguous()
            elif key == ".lora_B.weight":
                out[k] = t.reshape(*t.shape, *ones).contiguous()
            else:
                out[k] = t.reshape(1, -1, *ones).contiguous()


def _module_facts(host: nn.Module) -> dict[str, Any]:
    """What the PEFT writer needs to know of an adapted layer: its kind, whether it stores its
    weight transposed (``fan_in_fan_out``) and, for a convolution, its weight shape."""
    from .engine.layer import layer_kind

    kind = layer_kind(host)
    facts: dict[str, Any] = {"kind": kind, "transposed": _stores_transposed(host)}
    if kind == "conv":
        facts["weight_shape"] = list(host.stored_weight.shape)
    return facts


def _split(where: str, key: str, parts: dict[str, str]) -> tuple[str, str]:
    for part in parts:
        if key.endswith("." + part):
            return key[: -len(part) - 1], part
    raise AdapterFileError(
        f"{where}: tensor {key!r} is not one lorazoo maps (expected names ending in "
        f"{', '.join(sorted(parts))})"
    )


def _vera_doc(
    where: str, cfg: dict[str, Any], raw: dict[str, Tensor], model: nn.Module | None, partial: bool = False
) -> tuple[dict, dict]:
    from .engine.layer import layer_dims, layer_kind

    save_projection = bool(cfg.get("save_projection", True))
    tensors: dict[str, Tensor] = {}
    found: dict[str, dict[str, Tensor]] = {}
    parts = {"vera_lambda_b": "b", "vera_lambda_d": "d"}
    for key, t in raw.items():
        if key in ("base_model.vera_A", "base_model.vera_B"):
            tensors[f"{SHARED}.{key.rsplit('.', 1)[1]}"] = t
            continue
        path, part = _split(where, _strip(key), parts)
        found.setdefault(path, {})[parts[part]] = t
    if save_projection != bool(tensors):
        raise AdapterFileError(
            f"{where}: save_projection is {str(save_projection).lower()} but the projections "
            f"base_model.vera_A/vera_B are {'missing from' if save_projection else 'present in'} the file"
        )
    if not found:
        raise AdapterFileError(f"{where}: the folder holds no VeRA tensors")
    if model is None and not partial:
        raise AdapterFileError(
            f"{where}: a VeRA file does not record each layer's input size, so it is read only "
            "against a model (lorazoo.load(model, folder)), not converted on its own"
        )
    named = dict(model.named_modules()) if model is not None else {}
    modules: dict[str, Any] = {}
    for path, t in found.items():
        if set(t) != {"b", "d"}:
            raise AdapterFileError(f"{where}: module {path!r} lacks vera_lambda_b or vera_lambda_d")
        m = named.get(path)
        kind = layer_kind(m) if m is not None else None
        # Unknown without a model (partial reads, for display); io.load names a mismatch.
        d_in = layer_dims(m)[1] if kind else (None if model is None else -1)
        modules[path] = {"d_out": int(t["b"].shape[0]), "d_in": d_in, "kind": "linear"}
        tensors[f"{path}.vera_lambda_b"] = t["b"]
        tensors[f"{path}.vera_lambda_d"] = t["d"]
    config = {
        "r": int(cfg.get("r", 256)),
        "alpha": 1.0,
        "dropout": float(cfg.get("vera_dropout", 0.0)),
        "d_initial": float(cfg.get("d_initial", 0.1)),
        "projection_prng_key": int(cfg.get("projection_prng_key", 0)),
        "save_projection": save_projection,
    }
    return {"variant": "vera", "config": config, "modules": modules}, tensors


def _rank_pattern_paths(where: str, pattern: Any) -> dict[str, list[bool]]:
    """AdaLoRA's ``rank_pattern`` (``{"<p>.lora_E[.<adapter>]": [kept?, ...]}``, written by its
    final mask) as ``{<p>: [kept?, ...]}``."""
    if not isinstance(pattern, dict):
        raise AdapterFileError(
            f"{where}: rank_pattern must map modules to lists of booleans, got {pattern!r}"
        )
    out: dict[str, list[bool]] = {}
    for key, kept in pattern.items():
        m = re.fullmatch(r"(.+)\.lora_E(\.[^.]+)?", _strip(str(key)))
        if m is None or not isinstance(kept, list) or not all(isinstance(k, bool) for k in kept):
            raise AdapterFileError(
                f"{where}: rank_pattern entry {key!r}: {kept!r} is not AdaLoRA's form (a module's "
                "'<path>.lora_E' mapped to a list of booleans, one per initial rank)"
            )
        out[m.group(1)] = kept
    return out


def _adalora_doc(where: str, cfg: dict[str, Any], raw: dict[str, Tensor]) -> tuple[dict, dict]:
    """PEFT's AdaLoRA: ``lora_A`` (``k × d_in``), ``lora_E`` (``k × 1``), ``lora_B`` (``d_out × k``)
    per module, with ``k = init_r`` before the final mask and the kept count after it (PEFT then
    cuts the tensors by ``rank_pattern`` when saving). lorazoo's AdaLoRA holds the same tensors,
    the same scale ``lora_alpha / (init_r + 1e-5)``, and records each layer's kept rank."""
    if cfg.get("init_lora_weights", True) not in _PLAIN_INITS:
        raise AdapterFileError(f"{where}: init_lora_weights={cfg['init_lora_weights']!r} is not read")
    for key in ("use_dora", "use_rslora"):
        if cfg.get(key):
            raise AdapterFileError(f"{where}: {key}=true on an AdaLoRA adapter has no lorazoo form")
    if cfg.get("alpha_pattern"):
        raise AdapterFileError(
            f"{where}: alpha_pattern {cfg['alpha_pattern']!r} gives AdaLoRA modules their own alpha; "
            "one lorazoo adapter has one config, so it is not read"
        )
    init_r = cfg.get("init_r", 12)
    if isinstance(init_r, bool) or not isinstance(init_r, int) or init_r < 1:
        raise AdapterFileError(f"{where}: init_r must be a positive integer, got {init_r!r}")
    pattern = _rank_pattern_paths(where, cfg.get("rank_pattern") or {})
    parts = {"lora_A": "A", "lora_E": "E", "lora_B": "B"}
    found: dict[str, dict[str, Tensor]] = {}
    for key, t in raw.items():
        path, part = _split(where, _strip(key), parts)
        found.setdefault(path, {})[parts[part]] = t
    if not found:
        raise AdapterFileError(f"{where}: the folder holds no AdaLoRA tensors")
    unknown = sorted(set(pattern) - set(found))
    if unknown:
        raise AdapterFileError(
            f"{where}: rank_pattern names {unknown[:4]}, which the file holds no tensors for"
        )
    tensors: dict[str, Tensor] = {}
    modules: dict[str, Any] = {}
    for path, t in found.items():
        if set(t) != {"A", "E", "B"}:
            raise AdapterFileError(f"{where}: module {path!r} lacks one of lora_A, lora_E, lora_B")
        a, e, b = t["A"], t["E"], t["B"]
        k = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or b.dim() != 2 or tuple(e.shape) != (k, 1) or b.shape[1] != k or k > init_r:
            raise AdapterFileError(
                f"{where}: module {path!r} has lora_A {tuple(a.shape)}, lora_E {tuple(e.shape)}, "
                f"lora_B {tuple(b.shape)}; AdaLoRA's are k × d_in, k × 1 and d_out × k with "
                f"k <= init_r={init_r}"
            )
        kept = pattern.get(path)
        if kept is not None and (len(kept) != init_r or k not in (sum(kept), init_r)):
            raise AdapterFileError(
                f"{where}: module {path!r} keeps {sum(kept)} of {len(kept)} ranks by rank_pattern, "
                f"but its tensors have rank {k} (init_r={init_r})"
            )
        if kept is not None and k == init_r and sum(kept) < init_r:
            # tensors saved uncut: keep the pattern's rows, as PEFT's load does
            idx = torch.tensor([i for i, keep in enumerate(kept) if keep], dtype=torch.long)
            a, e, b = a.index_select(0, idx), e.index_select(0, idx), b.index_select(1, idx)
            k = int(idx.numel())
        tensors[f"{path}.lora_A"], tensors[f"{path}.lora_E"], tensors[f"{path}.lora_B"] = a, e, b
        modules[path] = {"d_out": int(b.shape[0]), "d_in": int(a.shape[1]), "kind": "linear"}
        modules[path]["adalora_rank"] = int(k)
    config: dict[str, Any] = {
        "r": init_r,
        "alpha": float(cfg.get("lora_alpha", 8)),
        "dropout": float(cfg.get("lora_dropout", 0.0)),
        "target_r": cfg.get("target_r", 8),
        "t_init": cfg.get("tinit", 0),
        "t_final": cfg.get("tfinal", 0),
        "delta_t": cfg.get("deltaT", 1),
        "beta1": cfg.get("beta1", 0.85),
        "beta2": cfg.get("beta2", 0.85),
        "orth_reg_weight": cfg.get("orth_reg_weight", 0.5),
        "orth_reg_form": "peft",
        "total_steps": cfg.get("total_step"),
    }
    return {"variant": "adalora", "config": config, "modules": modules}, tensors


def _base_weights(where: str, raw: dict[str, Tensor], model: nn.Module | None) -> list[str]:
    """Remove the base-layer weights PEFT stores beside an embedding adapter
    (``save_embedding_layers``) from ``raw``; with a model, check they equal its own (lorazoo
    adapts a base, it does not replace one). Returns the module paths they were stored for."""
    found = {}
    for key in list(raw):
        path = _strip(key)
        if path.endswith(".base_layer.weight"):
            found[path[: -len(".base_layer.weight")]] = raw.pop(key)
    if model is not None:
        named = dict(model.named_modules())
        for path, t in found.items():
            mine = getattr(named.get(path), "weight", None)
            if (
                not isinstance(mine, Tensor)
                or mine.shape != t.shape
                or not torch.equal(mine.detach().cpu(), t.to(mine.dtype))
            ):
                raise AdapterFileError(
                    f"{where}: the file stores its own base weight for {path!r} (PEFT's "
                    "save_embedding_layers, e.g. after resizing the vocabulary), and it differs from "
                    "this model's; lorazoo does not replace base weights: load the matching base model"
                )
    return sorted(found)


_ADAPTER_PARTS = (".lora_", ".vera_", "base_model.vera_")


def _saved_modules(
    where: str, names: Any, raw: dict[str, Tensor]
) -> tuple[dict[str, list[str]], dict[str, Tensor]]:
    """Remove the tensors of whole modules saved with the adapter (``modules_to_save``) from
    ``raw``. PEFT stores them under the module's own path (``base_model.model.<m>.<key>``); a
    module is the shortest path that is one of ``names`` or ends in ``.<name>``, as PEFT
    matches them. Returns ``({module path: [keys]}, {"__modules__.<m>.<key>": tensor})``."""
    if not names:
        return {}, {}
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise AdapterFileError(f"{where}: modules_to_save must be a list of module names, got {names!r}")
    saved: dict[str, list[str]] = {}
    tensors: dict[str, Tensor] = {}
    for key in list(raw):
        if any(part in key for part in _ADAPTER_PARTS):
            continue
        parts = _strip(key).split(".")
        for i in range(1, len(parts)):
            path = ".".join(parts[:i])
            if any(path == n or path.endswith("." + n) for n in names):
                rest = ".".join(parts[i:])
                saved.setdefault(path, []).append(rest)
                tensors[f"{MODULES}.{path}.{rest}"] = raw.pop(key)
                break
    return {p: sorted(k) for p, k in saved.items()}, tensors


def read_peft(
    path: str | os.PathLike, model: nn.Module | None = None, *, partial: bool = False
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A PEFT adapter folder as a lorazoo adapter document and tensors (the form
    ``lorazoo.load`` applies). ``model`` supplies layer shapes a file does not record (VeRA's
    input sizes); without it such a file is refused, unless ``partial`` (for display: those
    sizes are then None). Raises :class:`AdapterFileError` naming whatever cannot be mapped."""
    folder = _folder(path)
    where = repr(str(folder))
    cfg = read_config(folder)
    peft_type = cfg.get("peft_type")
    if peft_type not in ("LORA", "VERA", "ADALORA"):
        raise AdapterFileError(
            f"{where}: peft_type={peft_type!r} is not read; lorazoo reads PEFT's LORA (with use_rslora "
            "or use_dora), ADALORA and VERA adapters"
        )
    _refuse_unsupported(where, cfg)
    raw = read_tensors(folder)
    base_weights = _base_weights(where, raw, model)
    saved, saved_tensors = _saved_modules(where, cfg.get("modules_to_save"), raw)
    try:
        if peft_type == "LORA":
            doc, tensors = _lora_doc(where, cfg, raw)
        elif peft_type == "ADALORA":
            doc, tensors = _adalora_doc(where, cfg, raw)
        else:
            doc, tensors = _vera_doc(where, cfg, raw, model, partial)
    except (TypeError, ValueError, AttributeError, re.error) as exc:
        if isinstance(exc, AdapterFileError):
            raise
        raise AdapterFileError(
            f"{where}: {CONFIG_NAME} has a setting of the wrong type or form ({type(exc).__name__}: {exc})"
        ) from exc
    tensors.update(saved_tensors)
    if saved:
        doc["modules_to_save"] = saved
    dtypes = {t.dtype for t in tensors.values()}
    bad = [k for k, t in tensors.items() if not t.is_floating_point()]
    if bad:
        raise AdapterFileError(f"{where}: tensor {bad[0]!r} is not floating point")
    # lorazoo holds one dtype per adapter; a mixed file takes the widest.
    dtype = max(dtypes, key=lambda d: torch.finfo(d).bits) if dtypes else torch.float32
    doc.update({"dtype": str(dtype), "format": "peft", "peft_type": peft_type})
    doc["target_modules"] = cfg.get("target_modules")
    doc["base_weights_checked"] = base_weights
    return doc, {k: t.to(dtype) for k, t in tensors.items()}


# --------------------------------------------------------------------------------------------
# lorazoo -> PEFT
# --------------------------------------------------------------------------------------------


def _lora_config(r: int, alpha: float, dropout: float, targets: list[str], **flags: Any) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": _target_regex(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
        "base_model_name_or_path": None,
        "revision": None,
        "peft_version": PEFT_VERSION,
        **flags,
    }


def _target_regex(paths: list[str]) -> str:
    # A string target is matched by PEFT with re.fullmatch against each module path, so this
    # selects exactly these modules (a list would also match any path ending in ".<name>").
    return "^(" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"


def _alpha(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def peft_files(
    variant: str,
    config: dict[str, Any],
    modules: dict[str, Any],
    tensors: dict[str, Tensor],
    saved: dict[str, list[str]] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """PEFT's ``adapter_config.json`` and tensors for a lorazoo adapter given as its variant
    name, config dict, per-module facts (``kind``) and lorazoo-keyed tensors; ``saved`` lists
    the whole modules stored with it (``{module path: [keys]}``, tensors under
    ``__modules__.<path>.<key>``). Raises :class:`LorazooError` for a variant PEFT cannot
    express (OLoRA needs its base: see :func:`save_peft`)."""
    cfg, out = _peft_files(variant, config, modules, tensors)
    _conv_to_peft(out, modules)
    if saved:
        for path in saved:
            parts = path.split(".")
            for i in range(1, len(parts)):
                shorter = ".".join(parts[:i])
                clash = [n for n in saved if shorter == n or shorter.endswith("." + n)]
                if clash:
                    raise LorazooError(
                        f"the modules saved whole {sorted(saved)} have no PEFT form: PEFT selects "
                        f"{shorter!r} by the entry {clash[0]!r}, which would take {path!r}'s tensors"
                    )
        cfg["modules_to_save"] = sorted(saved)
        for path, keys in saved.items():
            for key in keys:
                out[f"{PREFIX}{path}.{key}"] = tensors[f"{MODULES}.{path}.{key}"].contiguous()
    return cfg, out


def _peft_files(
    variant: str, config: dict[str, Any], modules: dict[str, Any], tensors: dict[str, Tensor]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    paths = sorted(modules)
    out: dict[str, Tensor] = {}
    if variant in ("lora", "rslora", "loraplus", "dora"):
        dora = variant == "dora"
        rslora = variant == "rslora" or (dora and bool(config.get("rslora")))
        for p in paths:
            emb = modules[p].get("kind", "linear") == "embedding"
            out[PREFIX + p + (".lora_embedding_A" if emb else ".lora_A.weight")] = tensors[f"{p}.lora_A"]
            out[PREFIX + p + (".lora_embedding_B" if emb else ".lora_B.weight")] = tensors[f"{p}.lora_B"]
            if dora:
                if emb:
                    raise LorazooError(f"DoRA on the embedding {p!r} has no PEFT form lorazoo writes")
                out[PREFIX + p + ".lora_magnitude_vector"] = tensors[f"{p}.lora_magnitude_vector"]
        cfg = _lora_config(
            config["r"],
            _alpha(config["alpha"]),
            float(config.get("dropout", 0.0)),
            paths,
            use_rslora=rslora,
            use_dora=dora,
            fan_in_fan_out=_fan_in_fan_out(modules),
        )
        return cfg, {k: v.contiguous() for k, v in out.items()}
    if variant == "adalora":
        return _adalora_files(config, modules, tensors)
    if variant == "vera":
        for p in paths:
            if modules[p].get("kind", "linear") != "linear":
                raise LorazooError(f"VeRA on the {modules[p]['kind']} layer {p!r} has no PEFT form")
            out[PREFIX + p + ".vera_lambda_b"] = tensors[f"{p}.vera_lambda_b"]
            out[PREFIX + p + ".vera_lambda_d"] = tensors[f"{p}.vera_lambda_d"]
        a, b = tensors.get(f"{SHARED}.vera_A"), tensors.get(f"{SHARED}.vera_B")
        if a is None or b is None:
            raise LorazooError(
                "this VeRA adapter file does not hold its projections (save_projection=False) and "
                "PEFT's file needs them: load it into its model and save from there "
                "(lorazoo.save(model, folder, format='peft')), where they are regenerated"
            )
        out["base_model.vera_A"], out["base_model.vera_B"] = a, b
        cfg = {
            "peft_type": "VERA",
            "task_type": None,
            "r": config["r"],
            "target_modules": _target_regex(paths),
            "projection_prng_key": config.get("projection_prng_key", 0),
            "save_projection": True,
            "vera_dropout": float(config.get("dropout", 0.0)),
            "d_initial": float(config.get("d_initial", 0.1)),
            "bias": "none",
            "fan_in_fan_out": _fan_in_fan_out(modules),
            "modules_to_save": None,
            "init_weights": True,
            "inference_mode": True,
            "base_model_name_or_path": None,
            "revision": None,
            "peft_version": PEFT_VERSION,
        }
        return cfg, {k: v.contiguous() for k, v in out.items()}
    if variant == "olora":
        raise LorazooError(
            "an OLoRA adapter's tensors are relative to a rewritten base (W − s·B₀A₀, with B₀, A₀ from "
            "the QR of the original W); its PEFT form as a plain LoRA needs B₀ and A₀, so it is written "
            "only from a model holding the adapter: lorazoo.save(model, folder, format='peft')"
        )
    raise LorazooError(
        f"variant {variant!r} has no PEFT form; lorazoo writes PEFT folders for {', '.join(EXPORTABLE)}"
    )


def _fan_in_fan_out(modules: dict[str, Any]) -> bool:
    # PEFT's flag for layers storing their weight in × out (transformers' Conv1D). PEFT sets it
    # per layer to what the layer is whatever the file says (with a warning when they differ),
    # so a file adapting both kinds works either way; lorazoo writes true when any layer is one.
    return any(info.get("transposed", False) for info in modules.values())


def _adalora_files(
    config: dict[str, Any], modules: dict[str, Any], tensors: dict[str, Tensor]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """PEFT's AdaLoRA folder: the same three tensors per layer; a layer cut to its kept rank
    ``k < init_r`` gets a ``rank_pattern`` entry keeping its first ``k`` triplets, which makes
    PEFT cut its fresh layer to ``k`` before it loads the tensors (the scale stays
    ``lora_alpha / (init_r + 1e-5)`` on both sides)."""
    r = int(config["r"])
    out: dict[str, Tensor] = {}
    pattern: dict[str, list[bool]] = {}
    for p in sorted(modules):
        info = modules[p]
        if info.get("kind", "linear") != "linear":
            raise LorazooError(f"AdaLoRA on the {info['kind']} layer {p!r} has no PEFT form")
        for key in ("lora_A", "lora_E", "lora_B"):
            out[f"{PREFIX}{p}.{key}"] = tensors[f"{p}.{key}"]
        k = int(tensors[f"{p}.lora_A"].shape[0])
        if k < r:
            pattern[f"{p}.lora_E"] = [i < k for i in range(r)]
    target_r = config.get("target_r")
    total = config.get("total_steps")
    t_init, t_final = int(config.get("t_init", 0)), int(config.get("t_final", 0))
    cfg = _lora_config(
        8,  # PEFT's AdaLoRA ignores r (init_r is its rank)
        _alpha(config["alpha"]),
        float(config.get("dropout", 0.0)),
        sorted(modules),
        peft_type="ADALORA",
        fan_in_fan_out=_fan_in_fan_out(modules),
        init_r=r,
        target_r=int(target_r) if target_r is not None else max(1, (2 * r) // 3),
        tinit=t_init,
        tfinal=t_final,
        deltaT=int(config.get("delta_t", 1)),
        beta1=float(config.get("beta1", 0.85)),
        beta2=float(config.get("beta2", 0.85)),
        orth_reg_weight=float(config.get("orth_reg_weight", 0.5)),
        # PEFT requires a training length; a config without one gets the shortest valid one
        total_step=int(total) if total is not None else t_init + t_final + 1,
        rank_pattern=pattern or None,
    )
    return cfg, {k: v.contiguous() for k, v in out.items()}


@torch.no_grad()
def _olora_as_lora(
    entries: list, name: str, saved: dict[str, list[str]], saved_tensors: dict[str, Tensor]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """OLoRA adapter ``name`` as the plain LoRA of rank ``2r`` relative to the original base:
    ``A' = [A; A₀]``, ``B' = [B, −B₀]``, ``α' = 2α`` (``√2·α`` with rsLoRA), same scale."""
    cfg = entries[0][2].config
    tensors: dict[str, Tensor] = {}
    modules: dict[str, Any] = {}
    for path, host, a in entries:
        owners = [pt.owner for pt in host.patches]
        # Rewrites made before this adapter's own are part of the base its QR saw.
        others = sorted(set(owners[: owners.index(name)]) - {name}) if name in owners else []
        if others:
            raise LorazooError(
                f"cannot write OLoRA adapter {name!r} as PEFT LoRA: layer {path!r} also carries base "
                f"rewrites by {others}, so the adapter is not relative to the original weights a PEFT "
                "user loads it onto"
            )
        B0, A0 = a.initial_factors
        tensors[f"{path}.lora_A"] = torch.cat([a.lora_A.detach(), A0.to(a.lora_A)], dim=0).cpu()
        tensors[f"{path}.lora_B"] = torch.cat([a.lora_B.detach(), -B0.to(a.lora_B)], dim=1).cpu()
        modules[path] = _module_facts(host)
    variant = "rslora" if cfg.rslora else "lora"
    alpha = cfg.alpha * (math.sqrt(2.0) if cfg.rslora else 2.0)
    tensors.update(saved_tensors)
    config = {"r": 2 * cfg.r, "alpha": alpha, "dropout": cfg.dropout}
    return peft_files(variant, config, modules, tensors, saved)


def save_peft(
    model: nn.Module, path: str | os.PathLike, name: str = "default", *, format: str = "peft"
) -> Path:
    """Write adapter ``name`` of ``model`` as a PEFT adapter folder at ``path``.

    LoRA+ is written as LoRA (its learning rates are not part of the file), OLoRA as the plain
    LoRA of rank ``2r`` that gives the same output on the original base, VeRA with its
    projections. The folder is built beside ``path`` and renamed into place; into an existing
    folder the two files are replaced one after the other, each atomically."""
    from .engine.distributed import full_tensor
    from .engine.inject import adapters_named
    from .io import _layer_tensors, _shared_tensors
    from .trained import copies_of, state_of

    if format != "peft":
        raise LorazooError(f"unknown adapter file format {format!r}; use format='lorazoo' or format='peft'")
    entries = adapters_named(model, name)
    adapter = entries[0][2]
    variant = type(adapter).name
    if variant not in EXPORTABLE:
        raise LorazooError(
            f"adapter {name!r} is a {variant!r} adapter, which has no PEFT form; lorazoo writes PEFT "
            f"folders for {', '.join(EXPORTABLE)}"
        )
    saved: dict[str, list[str]] = {}
    saved_tensors: dict[str, Tensor] = {}
    for mpath, twin in copies_of(model, name).items():
        own = state_of(twin)
        saved[mpath] = sorted(own)
        for key, t in own.items():
            saved_tensors[f"{MODULES}.{mpath}.{key}"] = full_tensor(t).detach().to("cpu")
    if variant == "olora":
        cfg, tensors = _olora_as_lora(entries, name, saved, saved_tensors)
    else:
        tensors: dict[str, Tensor] = {}
        modules: dict[str, Any] = {}
        for mpath, host, a in entries:
            for key, t in _layer_tensors(a).items():
                tensors[f"{mpath}.{key}"] = full_tensor(t).detach().to("cpu")
            modules[mpath] = _module_facts(host)
        for key, t in _shared_tensors(adapter).items():
            tensors[f"{SHARED}.{key}"] = t.detach().to("cpu")
        if variant == "vera":  # PEFT's file carries the projections even where lorazoo's does not
            for key in ("vera_A", "vera_B"):
                tensors[f"{SHARED}.{key}"] = getattr(adapter.shared, key).detach().to("cpu")
        tensors.update(saved_tensors)
        cfg, tensors = peft_files(variant, adapter.config.to_dict(), modules, tensors, saved)
    return write_folder(path, cfg, tensors)


def _stores_transposed(host: nn.Module) -> bool:
    """True for a layer storing its weight in × out (transformers' Conv1D): PEFT's
    ``fan_in_fan_out``."""
    from .engine.kinds import kind_of

    kind = kind_of(host)
    return kind is not None and kind.name == "conv1d_hf"


def _is_embedding(host: nn.Module) -> bool:
    from .engine.layer import layer_kind

    return layer_kind(host) == "embedding"


def write_folder(path: str | os.PathLike, cfg: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into folder ``path``."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise LorazooError(f"{str(target)!r} exists and is not a folder; a PEFT adapter is a folder")
    blob = st_save({k: t.contiguous() for k, t in tensors.items()}, metadata={"format": "pt"})
    text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        (tmp / WEIGHTS_NAME).write_bytes(blob)
        (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")
        if not target.exists():
            os.replace(tmp, target)
            return target
        os.replace(tmp / WEIGHTS_NAME, target / WEIGHTS_NAME)
        os.replace(tmp / CONFIG_NAME, target / CONFIG_NAME)
        return target
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)


# --------------------------------------------------------------------------------------------
# Files without a model: inspect and convert
# --------------------------------------------------------------------------------------------


def open_any(path: str | os.PathLike, partial: bool = False) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """``(format, document, tensors)`` of a lorazoo adapter file or a PEFT adapter folder;
    format is ``"lorazoo"`` or ``"peft"``."""
    from .io import read

    if handles(path):
        doc, tensors = read_peft(path, partial=partial)
        return "peft", doc, tensors
    doc, tensors = read(path)
    return "lorazoo", doc, tensors


def _shape(t: Tensor) -> str:
    return "×".join(str(n) for n in t.shape) or "scalar"


def describe(path: str | os.PathLike) -> str:
    """A plain-text summary of an adapter file or PEFT folder: format, variant, config,
    modules with their shapes and ranks, tensor sizes."""
    fmt, doc, tensors = open_any(path, partial=True)
    p = Path(path)
    lines = []
    if fmt == "peft":
        folder = _folder(p)
        on_disk = sum((folder / n).stat().st_size for n in (CONFIG_NAME, WEIGHTS_NAME))
        peft_cfg = read_config(folder)
        lines.append(
            f"format:   PEFT adapter folder (peft_type {doc['peft_type']}, written by peft "
            f"{peft_cfg.get('peft_version', '?')})"
        )
    else:
        on_disk = p.stat().st_size
        lines.append(f"format:   lorazoo adapter file (written by lorazoo {doc.get('lorazoo_version', '?')})")
    lines.append(
        f"variant:  {doc['variant']}" + (f" (adapter name {doc['name']!r})" if doc.get("name") else "")
    )
    lines.append("config:   " + ", ".join(f"{k}={v!r}" for k, v in doc["config"].items()))
    lines.append(f"dtype:    {doc['dtype']}")
    modules = doc["modules"]
    kinds: dict[str, int] = {}
    for info in modules.values():
        kinds[info.get("kind", "linear")] = kinds.get(info.get("kind", "linear"), 0) + 1
    lines.append(
        f"modules:  {len(modules)} (" + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + ")"
    )
    width = max((len(m) for m in modules), default=0)
    for mpath in sorted(modules):
        info = modules[mpath]
        d_in = "?" if info.get("d_in") is None else info["d_in"]
        own = {
            k[len(mpath) + 1 :]: t
            for k, t in tensors.items()
            if k.startswith(mpath + ".") and "." not in k[len(mpath) + 1 :]
        }
        rank = own["lora_A"].shape[0] if "lora_A" in own else doc["config"].get("r")
        parts = ", ".join(f"{k} {_shape(t)}" for k, t in sorted(own.items()))
        lines.append(
            f"  {mpath:<{width}}  {info.get('kind', 'linear'):9s} {info['d_out']}×{d_in} (out×in)  "
            f"r={rank}  {parts}"
        )
    for mpath, keys in sorted((doc.get("modules_to_save") or {}).items()):
        parts = ", ".join(f"{k} {_shape(tensors[f'{MODULES}.{mpath}.{k}'])}" for k in keys)
        lines.append(f"saved whole: {mpath}  {parts}")
    shared = {k: t for k, t in tensors.items() if k.startswith(SHARED + ".")}
    for k, t in sorted(shared.items()):
        lines.append(f"shared:   {k[len(SHARED) + 1 :]} {_shape(t)}")
    numbers = sum(t.numel() for t in tensors.values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    lines.append(
        f"tensors:  {len(tensors)} tensors, {numbers:,} numbers, {nbytes:,} bytes of data; "
        f"{on_disk:,} bytes on disk"
    )
    if doc.get("base_weights_checked"):
        lines.append(
            f"note:     also stores base weights for {doc['base_weights_checked']} (not adapter "
            "tensors; lorazoo.load checks they equal the model's)"
        )
    return "\n".join(lines)


def _regenerate_shared(doc: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Shared state a lorazoo file does not store (VeRA without save_projection), rebuilt from
    the config and module shapes through the variant's own ``shared_state``."""
    from . import registry
    from .variant import LayerInfo

    cls = registry.variant(doc["variant"])
    config = cls.config_class.from_kwargs(**doc["config"])
    dtype = getattr(torch, doc["dtype"].split(".")[-1])
    layers = [
        LayerInfo(p, info["d_in"], info["d_out"], torch.empty(0), False, dtype, info.get("kind", "linear"))
        for p, info in sorted(doc["modules"].items())
    ]
    shared = cls.shared_state(config, layers)
    if shared is None:
        return {}
    return {f"{SHARED}.{k}": t.detach() for k, t in shared.named_buffers() if f"{SHARED}.{k}" not in tensors}


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str) -> Path:
    """Convert a lorazoo adapter file into a PEFT folder (``to="peft"``) or a PEFT folder into
    a lorazoo file (``to="lorazoo"``), without a model. Refuses what needs one: OLoRA's PEFT
    form (its base factors), and VeRA from PEFT (its layers' input sizes)."""
    if to not in ("peft", "lorazoo"):
        raise LorazooError(f"cannot convert to {to!r}; use 'peft' or 'lorazoo'")
    fmt, doc, tensors = open_any(src)
    if fmt == to:
        raise LorazooError(f"{str(src)!r} is already a {'PEFT folder' if to == 'peft' else 'lorazoo file'}")
    if to == "peft":
        if doc["variant"] == "olora":
            raise LorazooError(
                f"{str(src)!r} is an OLoRA adapter: its tensors are relative to a base rewritten with the "
                "QR factors of the original weights, which the file does not hold; load it into its model "
                "and use lorazoo.save(model, folder, format='peft') (the rank-2r plain LoRA equivalent)"
            )
        tensors = {**tensors, **_regenerate_shared(doc, tensors)}
        cfg, out = peft_files(
            doc["variant"], doc["config"], doc["modules"], tensors, doc.get("modules_to_save")
        )
        return write_folder(dst, cfg, out)
    return write_lorazoo_file(dst, doc, tensors)


def write_lorazoo_file(path: str | os.PathLike, doc: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """Write a document from :func:`read_peft` as a lorazoo adapter file, atomically."""
    from . import __version__, registry
    from .io import write_file

    cls = registry.variant(doc["variant"])
    config = cls.config_class.from_kwargs(**doc["config"])  # validated before anything is written
    out = {
        "name": "default",
        "variant": cls.name,
        "plugin": registry.plugin_of(cls.name),
        "config": config.to_dict(),
        "dtype": doc["dtype"],
        "modules": doc["modules"],
        "lorazoo_version": __version__,
    }
    if doc.get("modules_to_save"):
        out["modules_to_save"] = doc["modules_to_save"]
    return write_file(path, out, tensors)
