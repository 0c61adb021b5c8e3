"""Models spread over processes: sharded parameters (FSDP2) and data-parallel wrappers.

``torch.distributed.fsdp.fully_shard`` turns every parameter of the modules it shards into a
``DTensor`` split by rows: each process holds rows ``[offset, offset + n)`` of the whole tensor
as an ordinary local tensor (``Shard(0)``). Between forward passes only those shards exist.

The engine meets them in three places, all routed through this module:

* **merge / unmerge** first put modules that hold whole parameters after an evaluation
  forward back into their sharded state (:func:`reshard`). The update of the whole weight is
  ``W' = cast(g ⊙_row W + B·A)``, row by row, and the correction that makes the unmerge exact
  is kept per element. So each process applies the update to its own rows only (``B`` and
  ``g`` cut to those rows, ``A`` whole) and keeps the correction for its shard: the unmerge is
  as exact as on one process. Computing the factors needs the adapter's tensors (and, for
  DoRA, the weight) whole: they are gathered for that step (:func:`gathered`), a collective,
  so every process must call merge and unmerge together, as it calls the forward.
* **save** gathers each sharded adapter tensor (:func:`full_tensor`; also a collective: call
  ``lorazoo.save`` on every process, not only on rank 0) and writes the same file from each.
* **load** into a sharded adapter copies each process's rows of the file's tensors into its
  shard (:func:`copy_into`); no communication.

Data-parallel wrappers (``DistributedDataParallel``, ``DataParallel``) and ``torch.compile``
put the model under an attribute (``module.``, ``_orig_mod.``), which would prefix every path in
an adapter file; :func:`unwrap` finds the model inside, so files written from a wrapper load into
the bare model and the other way round.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ..errors import LorazooError

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def is_sharded(t: Tensor | None) -> bool:
    """True for a ``DTensor`` (a tensor spread over processes)."""
    # No tensor can be a DTensor before torch.distributed.tensor is imported; checking the
    # module table keeps this free for ordinary models and never imports torch.distributed.
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def local_view(t: Tensor) -> Tensor:
    """This process's part of ``t`` as a plain tensor sharing its storage and version counter
    (``t`` itself when not sharded). Writes into it change the shard."""
    if not is_sharded(t):
        return t
    return t.detach().to_local()


def full_tensor(t: Tensor) -> Tensor:
    """All of ``t`` as a plain tensor, detached: gathered from every process when sharded (a
    collective: every process of the mesh must call it), else ``t.detach()``."""
    if not is_sharded(t):
        return t.detach()
    return t.detach().full_tensor()


def local_rows(t: Tensor) -> tuple[int, int]:
    """``(offset, count)``: the rows of ``t`` (along dimension 0) this process holds."""
    if not is_sharded(t):
        return 0, t.shape[0]
    from torch.distributed.tensor import Shard

    split = [(i, p) for i, p in enumerate(t.placements) if not p.is_replicate()]
    if not split:
        return 0, t.shape[0]
    if len(split) > 1 or type(split[0][1]) is not Shard or split[0][1].dim != 0:
        raise LorazooError(
            f"lorazoo merges weights sharded by rows (placement Shard(0), fully_shard's default), "
            f"but this weight has placements {tuple(t.placements)}: shard it by rows, or gather "
            "the model onto one process (its full state dict) and merge there"
        )
    mesh_dim = split[0][0]
    size = t.device_mesh.size(mesh_dim)
    coordinate = t.device_mesh.get_coordinate()
    if coordinate is None:  # this process holds no part of the tensor
        return 0, 0
    n = t.shape[0]
    chunk = -(-n // size)  # rows per process, as torch.chunk splits them
    start = min(n, chunk * coordinate[mesh_dim])
    count = min(n, start + chunk) - start
    held = t.to_local().shape[0]
    if held != count:
        raise LorazooError(
            f"this process holds {held} rows of a sharded weight with {n} rows, but an even split "
            f"over {size} processes gives it {count}: lorazoo cannot tell which rows are its own; "
            "gather the model onto one process and merge there"
        )
    return start, count


def local_update(
    weight: Tensor, B: Tensor, A: Tensor, g: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The arguments of an exact update ``W ← cast(g ⊙_row W + B·A)`` restricted to the rows
    this process holds: ``(weight's local rows, B's rows, A, g's rows)``, with the weight as a
    tensor whose writes bypass autograd (``.data``). For a weight that is not sharded, the
    whole ``(weight.data, B, A, g)``."""
    if not is_sharded(weight):
        return weight.data, B, A, g
    start, count = local_rows(weight)
    rows = slice(start, start + count)
    return local_view(weight).data, B[rows], A, None if g is None else g[rows]


def bump_version(weight: Tensor) -> None:
    """Move the version counter of ``weight`` (and, when sharded, of its local shard) after a
    write through ``.data``, so caches and autograd's saved-tensor check see it."""
    torch.autograd.graph.increment_version(weight)
    if is_sharded(weight):
        torch.autograd.graph.increment_version(local_view(weight))


@torch.no_grad()
def copy_into(target: Tensor, source: Tensor) -> None:
    """``target.copy_(source)`` for a ``source`` holding all of ``target``; a sharded target
    takes its own rows of ``source``."""
    if not is_sharded(target):
        target.copy_(source)
        return
    start, count = local_rows(target)
    local_view(target).copy_(source[start : start + count])


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every sharded parameter of ``module`` and its submodules is replaced
    by a frozen plain copy of the whole tensor; the sharded parameters are put back after (also
    on an exception). Code written for plain tensors (a variant's ``lowrank``) then reads the
    adapter and the weight as on one process. Gathering is a collective: every process of the
    mesh must enter the block. Nothing is gathered, and nothing replaced, for a module without
    sharded parameters. Read only: writes to the copies are lost."""
    if "torch.distributed.tensor" not in sys.modules:  # nothing can be sharded
        yield module
        return
    swaps = [
        (owner, name, p)
        for owner in module.modules()
        for name, p in owner._parameters.items()
        if p is not None and is_sharded(p)
    ]
    try:
        for owner, name, p in swaps:
            owner._parameters[name] = nn.Parameter(full_tensor(p), requires_grad=False)
        yield module
    finally:
        for owner, name, p in swaps:
            owner._parameters[name] = p


def refuse_sharded(model: nn.Module, action: str, advice: str) -> None:
    """Refuse to add or remove adapters on a model sharded with ``fully_shard``, which fixes the
    tensors it manages, and on which modules, when it is called: an adapter added later would be
    neither sharded nor reduced across processes, and ejecting would hand sharded weights to
    modules it does not manage; both break the next forward."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return
    sharded = [n or "the model" for n, m in model.named_modules() if isinstance(m, fsdp.FSDPModule)]
    if sharded:
        raise LorazooError(
            f"cannot {action} a model sharded with torch.distributed.fsdp.fully_shard (sharded: "
            f"{sharded[:3]}{' ...' if len(sharded) > 3 else ''}): sharding fixes the model's "
            f"modules and tensors; {advice}"
        )


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module of ``model`` back into its sharded state before the engine writes
    weights. A root module keeps its parameters whole after a forward without backward (an
    evaluation); a merge written into those whole copies would be dropped at the next reshard.
    Local to each process (no communication)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:  # no module can be sharded before torch.distributed.fsdp is imported
        return
    for m in model.modules():
        if isinstance(m, fsdp.FSDPModule):
            m.reshard()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside data-parallel and compile wrappers (``.module``, ``._orig_mod``),
    whose module paths are the bare model's; ``model`` itself when it is not wrapped."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def accepts_wrapped(fn: _Fn) -> _Fn:
    """Let ``fn(model, ...)`` take a wrapped model: it runs on :func:`unwrap` ``(model)``, and a
    result that is the inner model is handed back as the wrapper the caller passed."""

    @functools.wraps(fn)
    def call(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        inner = unwrap(model)
        result = fn(inner, *args, **kwargs)
        return model if result is inner else result

    return call  # type: ignore[return-value]
