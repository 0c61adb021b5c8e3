"""Which modules of a model to adapt.

A target specification is one item or a list of items, each one of:

* ``"all-linear"``: every layer of a linear kind (``nn.Linear``, transformers' ``Conv1D``, any
  registered kind with ``linear = True``) except the output head;
* a module name, matched exactly or as a dotted suffix (``"q_proj"`` matches
  ``"model.layers.0.self_attn.q_proj"``);
* a regular expression, as ``re.compile(...)`` or a string prefixed ``"re:"``, matched
  against the full dotted path (``re.fullmatch``);
* a module class (``nn.Linear``, ``nn.Embedding``): every module of that type (``nn.Linear``
  means every layer of a linear kind, ``nn.Embedding`` every embedding, wrapped or not);
* a callable ``(path, module) -> bool``.

Every item must match at least one module; a typo fails loudly with the closest names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import nn

from ..errors import TargetError, closest
from .host import AdaptedLayer
from .kinds import kind_of, kinds
from .layer import is_linear, is_supported

Target = str | re.Pattern | type | Callable[[str, nn.Module], bool]
TargetSpec = Target | Sequence[Target]

ALL_LINEAR = "all-linear"
_HEAD_NAMES = ("lm_head", "classifier", "score", "head", "output_layer")


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
        if isinstance(head, nn.Module):
            return head
    linears = [(n, m) for n, m in model.named_modules() if is_linear(m)]
    for name, module in linears:
        if name.rsplit(".", 1)[-1] in _HEAD_NAMES:
            return module
    return linears[-1][1] if len(linears) > 1 else None


def _as_items(targets: TargetSpec) -> list[Target]:
    if isinstance(targets, (str, re.Pattern, type)) or callable(targets):
        return [targets]  # type: ignore[list-item]
    items = list(targets)
    if not items:
        raise TargetError("targets is empty; name at least one module, or use 'all-linear'")
    return items


def _describe(item: Target) -> str:
    if isinstance(item, re.Pattern):
        return f"re:{item.pattern}"
    if isinstance(item, type):
        return item.__name__
    if isinstance(item, str):
        return item
    return getattr(item, "__name__", repr(item))


def _matcher(item: Target, model: nn.Module) -> Callable[[str, nn.Module], bool]:
    if isinstance(item, str) and item == ALL_LINEAR:
        head = _output_head(model)
        return lambda n, m: is_linear(m) and m is not head
    if isinstance(item, str) and item.startswith("re:"):
        item = re.compile(item[3:])
    if isinstance(item, re.Pattern):
        pattern = item
        return lambda n, m: pattern.fullmatch(n) is not None
    if isinstance(item, str):
        if not item:
            raise TargetError("an empty string is not a module name")
        suffix = "." + item
        return lambda n, m: n == item or n.endswith(suffix)
    if isinstance(item, type):
        cls = item
        if cls is nn.Linear:
            return lambda n, m: is_linear(m)
        if cls is nn.Embedding:
            return lambda n, m: _adapts_as(m) == "embedding"
        # a layer already wrapped (by an earlier adapter) is still of its original class
        return lambda n, m: isinstance(m.original if isinstance(m, AdaptedLayer) else m, cls)
    if callable(item):
        return item
    raise TargetError(f"cannot interpret target {item!r}: use a name, 're:<regex>', a class or a callable")


def resolve(model: nn.Module, targets: TargetSpec) -> list[tuple[str, nn.Module]]:
    """The ``(path, module)`` pairs ``targets`` selects, in model order, checked for support.

    Modules already wrapped by lorazoo count as the layer they wrap; the modules inside a
    wrapper (its adapters) are never candidates.
    """
    items = _as_items(targets)
    candidates: list[tuple[str, nn.Module]] = []
    inside_host: list[str] = []
    for name, module in model.named_modules():
        if not name:
            continue  # the root cannot be replaced in place
        if any(name.startswith(p) for p in inside_host):
            continue
        if isinstance(module, AdaptedLayer):
            inside_host.append(name + ".")
        candidates.append((name, module))

    chosen: dict[str, nn.Module] = {}
    for item in items:
        match = _matcher(item, model)
        hits = [(n, m) for n, m in candidates if match(n, m)]
        if not hits:
            raise TargetError(_nothing_matched(item, candidates))
        for n, m in hits:
            chosen.setdefault(n, m)

    unsupported = [(n, m) for n, m in chosen.items() if not is_supported(m)]
    if unsupported:
        listed = ", ".join(f"{n} ({_why_not(m)})" for n, m in unsupported[:8])
        more = f" and {len(unsupported) - 8} more" if len(unsupported) > 8 else ""
        raise TargetError(
            f"targets matched modules lorazoo cannot adapt: {listed}{more}. Supported layer types: "
            f"{supported_labels()} (and subclasses that keep their forward). Name the layers "
            "inside, e.g. 'q_proj', or use 'all-linear'."
        )
    order = {n: i for i, (n, _) in enumerate(candidates)}
    return sorted(chosen.items(), key=lambda nm: order[nm[0]])


def _nothing_matched(item: Target, candidates: list[tuple[str, nn.Module]]) -> str:
    names = [n for n, _ in candidates]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    msg = f"target {_describe(item)!r} matched no module."
    if isinstance(item, str) and item != ALL_LINEAR and not item.startswith("re:"):
        near = closest(item, leaves) or closest(item, names)
        if near:
            msg += f" Did you mean {near!r}?"
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in candidates if is_supported(m)})
    if linear:
        msg += f" Layers lorazoo can adapt in this model (by last name): {', '.join(linear[:30])}"
        msg += " ..." if len(linear) > 30 else ""
    else:
        msg += f" The model has no layer lorazoo can adapt ({supported_labels()})."
    sample = ", ".join(names[:12])
    return msg + f". Module names start: {sample}" + (" ..." if len(names) > 12 else "")


def _adapts_as(module: nn.Module) -> str | None:
    kind = kind_of(module)
    return kind.adapts_as if kind is not None else None


def _why_not(module: nn.Module) -> str:
    kind = kind_of(module)
    why = kind.refusal(module) if kind is not None else None
    return f"{type(module).__name__}: {why}" if why else type(module).__name__


def supported_labels() -> str:
    """The registered layer kinds, as messages name them."""
    return ", ".join(k.label or k.name for k in kinds())
