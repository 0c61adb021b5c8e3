"""Layer kinds are plugins: a third-party distribution adds one through the ``lorazoo`` entry-point
group (``lorazoo_layer_kinds``) and the conformance suite runs on it; the built-in kinds come
through the same hook; broken kinds are refused clearly."""

from __future__ import annotations

import sys

import pytest
import torch
from test_plugins import make_distribution
from torch import nn

import lorazoo
import lorazoo.testing
from lorazoo import registry
from lorazoo.errors import PluginError, TargetError

# A linear layer that keeps its weight transposed (``in × out``) in a buffer named ``wt``.
KIND = '''
"""A third-party layer kind: a linear map whose weight is stored transposed in a buffer."""
import torch
from torch import nn

import lorazoo
from lorazoo.engine.kinds.linear import AdaptedLinear


class TransposedLinear(nn.Module):
    def __init__(self, d_in, d_out, bias=True, dtype=None):
        super().__init__()
        self.register_buffer("wt", torch.randn(d_in, d_out, dtype=dtype) / d_in**0.5)
        self.bias = nn.Parameter(torch.randn(d_out, dtype=dtype) * 0.1) if bias else None

    def forward(self, x):
        y = x @ self.wt
        return y + self.bias if self.bias is not None else y


class AdaptedTransposed(AdaptedLinear):
    base_tensors = ("wt", "bias")
    weight_name = "wt"

    @property
    def weight(self):
        return self.stored_weight.t()

    def weight_view(self):
        return self.stored_weight.t()

    def merge_target(self):
        return {target}

    def orient(self, B, A, g):
        return {orient}

    def base_forward(self, x):
        y = x @ self.stored_weight
        return y + self.bias if self.bias is not None else y


class TransposedKind(lorazoo.LayerKind):
    name = "{name}"
    adapts_as = "linear"
    linear = True
    host_class = AdaptedTransposed
    label = "TransposedLinear"

    def recognise(self, module):
        return isinstance(module, TransposedLinear)

    def dims(self, module):
        d_in, d_out = module.wt.shape
        return d_out, d_in

    def stored_weight(self, module):
        return module.wt

    def weight_view(self, stored):
        return stored.t()

    def example(self, d_in, d_out, bias, dtype):
        return TransposedLinear(d_in, d_out, bias, dtype)


@lorazoo.hookimpl
def lorazoo_layer_kinds():
    return [TransposedKind()]
'''

# writes through the transposed view, so row factors (DoRA) apply to output features
GOOD = {"target": "self.stored_weight.t()", "orient": "(B, A, g)"}
# a kind that forgets its layout: merges write B·A into an in × out tensor as if it were out × in
BAD = {"target": "self.stored_weight", "orient": "(B, A, g)"}


def kind_body(name: str, impl: dict) -> str:
    body = KIND
    for k, v in impl.items():
        body = body.replace("{" + k + "}", v)
    return body.replace("{name}", name)


@pytest.fixture
def site(tmp_path):
    added = []

    def install(dist, module, name, body):
        src = make_distribution(tmp_path, dist, module, name, body)
        sys.path.insert(0, str(src))
        added.append((str(src), module))
        registry.reload()

    yield install
    for path, module in added:
        sys.path.remove(path)
        for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            del sys.modules[name]
    registry.reload()


def test_builtin_kinds_come_through_the_hook():
    names = [k.name for k in lorazoo.layer_kinds()]
    assert names[:3] == ["linear", "embedding", "conv1d_hf"]
    assert registry.layer_kind_named("embedding").adapts_as == "embedding"
    with pytest.raises(PluginError, match="Did you mean 'embedding'"):
        registry.layer_kind_named("embeding")


def test_third_party_kind_is_injected_and_conforms(site):
    site("lorazoo-transposed", "lz_transposed", "transposed", kind_body("transposed", GOOD))
    kind = registry.layer_kind_named("transposed")
    from lz_transposed.plugin import TransposedLinear

    torch.manual_seed(0)
    model = nn.Sequential(
        TransposedLinear(6, 5), nn.Tanh(), TransposedLinear(5, 4, bias=False), nn.Linear(4, 3)
    )
    x = torch.randn(7, 6)
    with torch.no_grad():
        y0 = model(x)
    lorazoo.inject(model, "lora", targets="all-linear", r=2)  # the head (last nn.Linear) left out
    with torch.no_grad():
        assert torch.equal(model(x), y0), "LoRA starts at ΔW = 0"
    assert [type(m).__name__ for m in model][:3] == ["AdaptedTransposed", "Tanh", "AdaptedTransposed"]
    assert isinstance(model[3], nn.Linear)
    assert model[0].kind is kind
    assert set(model.state_dict()) >= {"0.wt", "0.bias", "2.wt"}
    lorazoo.eject(model)
    assert isinstance(model[0], TransposedLinear) and model[0].wt.shape == (6, 5)
    lorazoo.testing.run_kind_conformance("transposed", variants=["lora", "dora", "vera"], max_examples=8)


def test_conformance_catches_a_kind_that_writes_the_wrong_layout(site):
    site("lorazoo-badkind", "lz_badkind", "badkind", kind_body("badkind", BAD))
    case = lorazoo.testing.Case(
        shapes=((6, 6, True),), r=2, alpha=4.0, dtype=torch.float32, batch=(3,), seed=0
    )
    with pytest.raises(AssertionError, match="merged vs unmerged"):
        lorazoo.testing.check_kind("lora", case, "badkind")


def test_a_kind_that_is_not_a_layer_kind_is_refused(site):
    body = "import lorazoo\n\n@lorazoo.hookimpl\ndef lorazoo_layer_kinds():\n    return [object()]\n"
    site("lorazoo-notakind", "lz_notakind", "notakind", body)
    with pytest.raises(PluginError, match="not a lorazoo.LayerKind"):
        lorazoo.layer_kinds()


def test_refusal_names_the_reason():
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0))
    with pytest.raises(TargetError, match="max_norm=1.0 renormalises rows"):
        lorazoo.inject(model, "lora", targets=[nn.Embedding], r=2)
    assert isinstance(model[0], nn.Embedding)
