"""``torch.compile`` of adapted models: compiled gradients equal eager ones for every registered
variant, and lorazoo's own code adds no graph breaks.

Compiled (``aot_eager``) and eager runs evaluate the same real-number gradients; where they take
different paths (DoRA alone on a layer finishes its output in place in eager mode and adds a
contribution in the traced graph) only the order of floating-point operations differs. On these
tiny layers (at most 16 terms per sum, rank 4) that reorders a handful of roundings of terms no
larger than the largest gradient entry, so the difference is a few units of the dtype's roundoff
times ``max|∂|``: the bounds below (``RTOL``) leave a factor of about 100 above that in fp32 and
10⁵ in fp64, and stay far below the errors of a wrong gradient (tens of percent).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from lorazoo_plugins import dora as D
from torch import nn

import lorazoo
from lorazoo.engine.inject import hosts, iter_adapters
from lorazoo.testing import perturb

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
VARIANTS = sorted(lorazoo.variants())


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def small_model(dtype: torch.dtype, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16, dtype=dtype), nn.SiLU(), nn.Linear(16, 8, bias=False, dtype=dtype))


def adapted(variant: str, dtype: torch.dtype, name: str = "default", model=None, **hyper) -> nn.Sequential:
    model = small_model(dtype) if model is None else model
    cls = lorazoo.variant(variant)
    lorazoo.inject(
        model, variant, targets=[nn.Linear], name=name, **{"r": 4, "alpha": 8, **cls.example_config, **hyper}
    )
    perturb(model, 1, name=name)
    model.train()
    return model


def gradients(model: nn.Module, fn, x: torch.Tensor, gout: torch.Tensor):
    for p in model.parameters():
        p.grad = None
    y = fn(x)
    y.backward(gout)
    grads = {
        f"{path}.{n}.{k}": p.grad.clone()
        for path, n, a in iter_adapters(model)
        for k, p in a.named_parameters()
        if p.requires_grad
    }
    return y.detach(), grads


def assert_compiled_equals_eager(model: nn.Module, dtype: torch.dtype, fullgraph: bool = True) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 12, generator=g, dtype=dtype)
    gout = torch.randn(3, 5, 8, generator=g, dtype=dtype)
    y_eager, eager = gradients(model, model, x, gout)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
    y_comp, comp = gradients(model, compiled, x, gout)
    rtol = RTOL[dtype]
    assert torch.allclose(y_comp, y_eager, rtol=0, atol=rtol * float(y_eager.abs().max()))
    assert eager and eager.keys() == comp.keys()
    for name, ge in eager.items():
        bound = rtol * float(ge.abs().max())
        err = float((comp[name] - ge).abs().max())
        assert err <= bound, (
            f"{name}: compiled gradient off by {err:.3g} (max |∂| {float(ge.abs().max()):.3g})"
        )
    # and the compiled inference forward
    model.eval()
    with torch.no_grad():
        y_e = model(x)
        y_c = compiled(x)
    assert torch.allclose(y_c, y_e, rtol=0, atol=rtol * float(y_e.abs().max()))


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_gradients_equal_eager(variant):
    assert_compiled_equals_eager(adapted(variant, torch.float32), torch.float32)


def test_dora_compiled_paths_fp64(monkeypatch):
    """DoRA's other forward paths in one compiled model (fp64, the tight bound): on the first
    layer alone with the norm's gradient (``detach_norm=False``) by the identity and its
    cancellation guard, on the second beside a LoRA adapter (the general path) with the dense
    norm."""
    monkeypatch.setattr(D, "DENSE_MAX_NUMEL", 150)  # 16×12 by the identity, 8×16 dense
    model = small_model(torch.float64)
    lorazoo.inject(model, "dora", targets=["0"], r=4, alpha=8, detach_norm=False)
    lorazoo.inject(model, "dora", targets=["2"], r=4, alpha=8, name="second")
    lorazoo.inject(model, "lora", targets=["2"], r=4, alpha=8, name="other")
    perturb(model, 1)
    model.train()
    host0, host2 = (h for _, h in hosts(model))
    assert host0._solo is not None and host2._solo is None
    assert [D.norm_method(*h.weight.shape) for h in (host0, host2)] == ["identity", "dense"]
    assert_compiled_equals_eager(model, torch.float64)


def test_dora_compiled_half_base():
    """fp32 adapters on a bf16 base (the default for half-precision models)."""
    model = adapted("dora", torch.bfloat16)
    assert next(iter(iter_adapters(model)))[2].lora_A.dtype == torch.float32
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 12, generator=g).to(torch.bfloat16)
    gout = torch.randn(3, 5, 8, generator=g).to(torch.bfloat16)
    _, eager = gradients(model, model, x, gout)
    _, comp = gradients(model, torch.compile(model, backend="aot_eager", fullgraph=True), x, gout)
    for name, ge in eager.items():
        # the two paths round the layer output to bf16 at different points (u = 2⁻⁸)
        bound = 4 * 2.0**-8 * float(ge.abs().max())
        assert float((comp[name] - ge).abs().max()) <= bound, name


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_no_graph_breaks(variant, grad):
    """LoRA and DoRA trace into one graph, in training and in inference (DoRA used to break on
    its norm cache's address comparisons and on two data-dependent branches: 7 breaks on this
    two-layer model in training)."""
    model = adapted(variant, torch.float32)
    if not grad:
        model.eval()
    x = torch.randn(4, 12)
    with torch.set_grad_enabled(grad):
        explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]
    assert explanation.graph_count == 1
