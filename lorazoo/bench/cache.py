"""Where ``lorazoo bench`` keeps its pre-trained base model, and how it writes it safely.

The cache directory is, in order of precedence: the ``--cache-dir`` option, the
``LORAZOO_CACHE_DIR`` environment variable, ``$XDG_CACHE_HOME/lorazoo``, ``~/.cache/lorazoo``.
A base is stored as ``bench/base-<key>.pt`` where ``key`` hashes everything that determines its
weights (model config, pre-training recipe, the source-domain bytes, seed, device kind), so a
change to any of them pre-trains a new base instead of reusing a stale one. Files are written to
a temporary name in the same directory and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

ENV_VAR = "LORAZOO_CACHE_DIR"


def cache_dir(option: str | os.PathLike | None = None) -> Path:
    if option:
        return Path(option).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lorazoo"


def key_of(recipe: dict[str, Any]) -> str:
    blob = json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def base_path(root: Path, key: str) -> Path:
    return root / "bench" / f"base-{key}.pt"


def load_base(path: Path) -> dict[str, Any] | None:
    """The cached ``{"state_dict", "meta"}``, or None when absent or unreadable (then the caller
    pre-trains again and overwrites it)."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a corrupt or foreign file is treated as a miss
        return None
    if not isinstance(blob, dict) or "state_dict" not in blob or "meta" not in blob:
        return None
    return blob


def save_base(path: Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}, "meta": meta}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
