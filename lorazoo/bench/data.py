"""The two text domains of ``lorazoo bench``, built from files every CPython ships.

* **Source domain** (pre-training, and the "what it forgot" evaluation): the standard library's
  own Python source, the top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]``.
* **Target domain** (adaptation, the "what it learned" evaluation): English prose from the
  interpreter's documentation, the help topics in ``pydoc_data.topics``. Where a distribution
  leaves that module out, docstrings extracted with ``ast`` from the same standard-library files
  stand in (prose too, though closer to the source domain).

Splits are fixed and seeded: documents are first put in a canonical order (sorted names, never
the order the filesystem lists them in), then shuffled with ``random.Random(seed)``; the first
documents up to a byte quota form the evaluation split, the rest the training split. Nothing is
downloaded, so the same Python with the same seed always yields the same bytes; the splits'
SHA-256 goes into the cache key of the pre-trained base.
"""

from __future__ import annotations

import ast
import hashlib
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SEPARATOR = b"\n\n"


@dataclass(frozen=True)
class Split:
    """One domain split: the documents' bytes joined by blank lines."""

    data: bytes
    names: tuple[str, ...]

    @property
    def documents(self) -> int:
        return len(self.names)

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class Domain:
    name: str
    origin: str
    train: Split
    eval: Split

    def sha256(self) -> str:
        h = hashlib.sha256()
        for part in (self.train.data, b"\0", self.eval.data):
            h.update(part)
        return h.hexdigest()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "origin": self.origin,
            "train_bytes": self.train.nbytes,
            "train_documents": self.train.documents,
            "eval_bytes": self.eval.nbytes,
            "eval_documents": self.eval.documents,
            "eval_names": list(self.eval.names),
            "sha256": self.sha256(),
        }


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_sources() -> list[tuple[str, bytes]]:
    root = stdlib_dir()
    docs = []
    for path in sorted(root.glob("*.py"), key=lambda p: p.name):
        try:
            docs.append((path.name, path.read_bytes()))
        except OSError:  # an unreadable file is skipped; the byte counts in the report say so
            continue
    return docs


def _topics() -> tuple[list[tuple[str, bytes]], str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return _docstrings(), "docstrings of the standard library (ast; pydoc_data is absent)"
    docs = [(k, topics[k].encode("utf-8")) for k in sorted(topics)]
    return docs, "pydoc_data.topics (the interpreter's help topics)"


def _docstrings() -> list[tuple[str, bytes]]:
    docs = []
    for name, src in _stdlib_sources():
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    parts.append(doc)
        if parts:
            docs.append((name, "\n\n".join(parts).encode("utf-8")))
    return docs


def _split(
    docs: list[tuple[str, bytes]], seed: int, eval_bytes: int, train_cap: int | None
) -> tuple[Split, Split]:
    order = sorted(docs)  # canonical order first, whatever order the files were listed in
    random.Random(seed).shuffle(order)
    ev: list[tuple[str, bytes]] = []
    tr: list[tuple[str, bytes]] = []
    ev_bytes = tr_bytes = 0
    for name, body in order:
        if ev_bytes < eval_bytes:
            ev.append((name, body))
            ev_bytes += len(body) + len(SEPARATOR)
        elif train_cap is None or tr_bytes < train_cap:
            tr.append((name, body))
            tr_bytes += len(body) + len(SEPARATOR)

    def join(part: list[tuple[str, bytes]]) -> Split:
        return Split(SEPARATOR.join(b for _, b in part), tuple(n for n, _ in part))

    return join(tr), join(ev)


def load_domains(
    seed: int,
    source_eval_bytes: int,
    target_eval_bytes: int,
    source_train_cap: int | None = None,
    target_train_cap: int | None = None,
) -> tuple[Domain, Domain]:
    """``(source, target)`` with fixed, seeded train/eval splits."""
    src_docs = _stdlib_sources()
    if not src_docs:
        from ..errors import LorazooError

        raise LorazooError(
            f"no standard-library sources found under {stdlib_dir()}; lorazoo bench needs them"
        )
    tr, ev = _split(src_docs, seed, source_eval_bytes, source_train_cap)
    source = Domain("stdlib-source", f"*.py in {stdlib_dir()}", tr, ev)
    tgt_docs, origin = _topics()
    tr, ev = _split(tgt_docs, seed + 1, target_eval_bytes, target_train_cap)
    target = Domain("python-docs-prose", origin, tr, ev)
    return source, target
