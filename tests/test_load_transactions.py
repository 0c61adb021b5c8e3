"""``lorazoo.load`` is all or nothing, also under KeyboardInterrupt.

A trace function counts the line events executed inside lorazoo (the library and its built-in
variant plugins) during one load, then the load is repeated with a KeyboardInterrupt raised at
the 1st, 2nd, ... k-th line event, for every k and every registered variant, in fp32 and bf16, into a model
without the adapter (inject from the file) and into one that has it (tensors replaced). After
each interrupted load the model must be bit for bit as before, or exactly as a completed load
leaves it.
"""

import os
import sys
import tempfile
from pathlib import Path

import lorazoo_plugins
import pytest
import torch
from test_engine import Net, state

import lorazoo
from lorazoo.engine.inject import hosts
from lorazoo.testing import perturb

ROOTS = tuple(os.path.dirname(m.__file__) + os.sep for m in (lorazoo, lorazoo_plugins))
X = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))


class InterruptAt:
    """Trace lorazoo's lines; raise KeyboardInterrupt at line event ``k`` (never when k = 0)."""

    def __init__(self, k: int = 0):
        self.k = k
        self.count = 0

    def _global(self, frame, event, arg):
        return self._local if frame.f_code.co_filename.startswith(ROOTS) else None

    def _local(self, frame, event, arg):
        if event == "line":
            self.count += 1
            if self.count == self.k:
                raise KeyboardInterrupt(f"interrupt at line event {self.k}")
        return self._local

    def __enter__(self):
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)


def _hyper(variant):
    return {"r": 4} if variant == "vera" else {"r": 4, "alpha": 8}


def _model(variant, existing, dtype):
    model = Net().to(dtype)
    if existing:
        lorazoo.inject(model, variant, targets=["q_proj", "v_proj"], **_hyper(variant))
        perturb(model, 11)
    return model


def observed(model):
    """What a user could observe, plus the engine's bookkeeping on each adapted layer."""
    mods, tensors, flags = state(model)
    books = [
        (path, tuple(h.adapters), h.active, h.merged is None, [p.owner for p in h.patches])
        for path, h in hosts(model)
    ]
    return mods, tensors, flags, books, "_lorazoo_frozen" in model.__dict__


def same(a, b) -> bool:
    mods, tensors, flags, books, frozen = a
    return (
        (mods, flags, books, frozen) == (b[0], b[2], b[3], b[4])
        and tensors.keys() == b[1].keys()
        and all(torch.equal(tensors[k], b[1][k]) for k in tensors)
    )


def cases():
    for variant in lorazoo.variants():
        for existing in (False, True):
            yield pytest.param(variant, existing, id=f"{variant}-{'existing' if existing else 'fresh'}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant, existing", list(cases()))
def test_load_interrupted_at_every_line_is_all_or_nothing(variant, existing, dtype):
    with tempfile.TemporaryDirectory() as d:
        source = Net().to(dtype)
        lorazoo.inject(source, variant, targets=["q_proj", "v_proj"], **_hyper(variant))
        perturb(source, 3)
        source.eval()
        path = lorazoo.save(source, Path(d) / "a.safetensors")

        done = _model(variant, existing, dtype)
        with InterruptAt() as counter:
            lorazoo.load(done, path)
        total = counter.count
        assert total > 100  # the trace sees the load
        assert torch.equal(done.eval()(X.to(dtype)), source(X.to(dtype)))
        after = observed(done)

        outcomes = {"unchanged": 0, "loaded": 0}
        model = _model(variant, existing, dtype)
        before = observed(model)
        for k in range(1, total + 1):
            try:
                with pytest.raises(KeyboardInterrupt), InterruptAt(k):
                    lorazoo.load(model, path)
                # nothing global left changed either (grad mode, default device)
                assert torch.is_grad_enabled(), f"grad mode left off by an interrupt at line event {k}"
                assert torch.empty(0).device.type == "cpu", f"default device changed at line event {k}"
            finally:
                torch.set_grad_enabled(True)
            now = observed(model)
            if same(now, before):
                outcomes["unchanged"] += 1  # the same model serves the next k
            elif same(now, after):
                outcomes["loaded"] += 1
                model = _model(variant, existing, dtype)
            else:
                pytest.fail(
                    f"{variant}: an interrupt at line event {k} of {total} left the model half-loaded"
                )
        assert outcomes["unchanged"] > 0
