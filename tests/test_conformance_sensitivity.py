"""The conformance suite can fail: deliberately broken toy variants are caught by the check that
guards the broken invariant, while the same toy, unbroken, passes those checks.

Each toy is LoRA written out by hand (its own tensors, forward and low-rank form, off the
engine's fused path) with one defect. A suite that passed any of them would be vacuous for that
invariant, whatever it reports for the real variants.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorazoo
import lorazoo.testing
from lorazoo import registry

EXAMPLES = 15


class ToyLoRA(lorazoo.Variant):
    """``s·B·A·drop(x)`` with ``A`` Kaiming-uniform, ``B`` zero: correct in every respect."""

    name = "toy_ok"
    config_class = lorazoo.VariantConfig
    fused_forward = False

    def __init__(self, layer, config, shared=None):
        super().__init__(layer, config, shared)
        opts = {"dtype": layer.adapter_dtype, "device": layer.device}
        self.lora_A = nn.Parameter(torch.empty(config.r, layer.d_in, **opts))
        self.lora_B = nn.Parameter(torch.zeros(layer.d_out, config.r, **opts))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.config.alpha / self.config.r

    def lowrank(self, weight=None):
        return lorazoo.LowRank(self.lora_A, self.lora_B, self.scale)

    def forward(self, x, base_out, host):
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        return F.linear(h, self.lora_B) * self.scale

    @classmethod
    def num_trainable(cls, d_in, d_out, config):
        return config.r * (d_in + d_out)


class OffMerge(ToyLoRA):
    """The merge folds in 1 % more than the forward adds."""

    name = "toy_off_merge"

    def lowrank(self, weight=None):
        return lorazoo.LowRank(self.lora_A, self.lora_B, 1.01 * self.scale)


class NotIdentityAtInit(ToyLoRA):
    """``B`` starts at 1e-3 instead of 0, yet the class claims a bit-exact start."""

    name = "toy_not_identity"

    def __init__(self, layer, config, shared=None):
        super().__init__(layer, config, shared)
        with torch.no_grad():
            self.lora_B.fill_(1e-3)


class NotIdentityWithinTau(NotIdentityAtInit):
    """The same start, claiming only agreement within the tolerance model."""

    name = "toy_not_identity_tau"
    exact_at_init = False


class DeadForward(ToyLoRA):
    """The forward adds nothing, though the low-rank form says it should."""

    name = "toy_dead"

    def forward(self, x, base_out, host):
        return torch.zeros_like(base_out)


class WrongCount(ToyLoRA):
    """The parameter formula forgets ``B``."""

    name = "toy_wrong_count"

    @classmethod
    def num_trainable(cls, d_in, d_out, config):
        return config.r * d_in


class DetachedB(ToyLoRA):
    """``B`` is trainable but the forward cuts its gradient."""

    name = "toy_detached"

    def forward(self, x, base_out, host):
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        return F.linear(h, self.lora_B.detach()) * self.scale


class NoDropout(ToyLoRA):
    """Accepts ``dropout`` but never applies it."""

    name = "toy_no_dropout"

    def forward(self, x, base_out, host):
        return F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scale


class UnsavedState(ToyLoRA):
    """A random row mix that shapes the update lives in a non-persistent buffer: files lose it."""

    name = "toy_unsaved"

    def __init__(self, layer, config, shared=None):
        super().__init__(layer, config, shared)
        mix = torch.rand(config.r, 1, dtype=layer.adapter_dtype) + 0.5
        self.register_buffer("mix", mix.to(layer.device), persistent=False)

    def lowrank(self, weight=None):
        return lorazoo.LowRank(self.lora_A * self.mix, self.lora_B, self.scale)

    def forward(self, x, base_out, host):
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A * self.mix)
        return F.linear(h, self.lora_B) * self.scale


class WritesBase(ToyLoRA):
    """Rewrites the base weight behind the engine's back (not through ``host.patch_base``)."""

    name = "toy_writes_base"
    exact_at_init = False

    def prepare_base(self, host, name):
        with torch.no_grad():
            host.weight.mul_(1 + 2**-6)


TOYS = [
    ToyLoRA,
    OffMerge,
    NotIdentityAtInit,
    NotIdentityWithinTau,
    DeadForward,
    WrongCount,
    DetachedB,
    NoDropout,
    UnsavedState,
    WritesBase,
]


class _Toys:
    @lorazoo.hookimpl
    def lorazoo_variants(self):
        return TOYS


@pytest.fixture(scope="module", autouse=True)
def toys():
    plugin = _Toys()
    registry.register(plugin, name="conformance-sensitivity-toys")
    yield
    registry.unregister(plugin)


def run(variant: str, check: str) -> None:
    lorazoo.testing.run_conformance(variant, max_examples=EXAMPLES, checks=[check])


@pytest.mark.parametrize(
    "check",
    [
        "init_identity",
        "perturbed_differs",
        "merge_equivalence",
        "unmerge_exact",
        "eject_exact",
        "param_count",
        "dropout",
        "delta_consistency",
        "gradients",
        "roundtrip",
    ],
)
def test_the_correct_toy_passes(check):
    # The control: every failure below comes from the defect, not from the toy's construction.
    run("toy_ok", check)


@pytest.mark.parametrize(
    ("variant", "check", "message"),
    [
        ("toy_off_merge", "merge_equivalence", "merged vs unmerged"),
        ("toy_off_merge", "delta_consistency", "forward contribution and delta_weight disagree"),
        ("toy_not_identity", "init_identity", "differ from the base at initialisation"),
        ("toy_not_identity_tau", "init_identity", "at init: .* outside tolerance"),
        ("toy_dead", "perturbed_differs", "no output differs from the base"),
        ("toy_wrong_count", "param_count", "formula says"),
        ("toy_detached", "gradients", "got no gradient"),
        ("toy_no_dropout", "dropout", "two forwards should differ"),
        ("toy_unsaved", "roundtrip", "forward differs after save → load"),
    ],
)
def test_a_broken_toy_fails_the_check_guarding_its_defect(variant, check, message):
    with pytest.raises(AssertionError, match=message):
        run(variant, check)


def test_a_base_written_behind_the_engines_back_fails_eject():
    # The engine may also notice the foreign write and refuse; either way the suite goes red.
    with pytest.raises((AssertionError, lorazoo.LorazooError)):
        run("toy_writes_base", "eject_exact")


def test_an_unmerge_off_by_one_ulp_in_one_element_fails(monkeypatch):
    real = lorazoo.unmerge

    def unmerge_one_ulp_off(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        with torch.no_grad():
            first = next(k for k in model.state_dict() if k.endswith("weight") and ".adapters." not in k)
            flat = model.get_parameter(first).view(-1)
            flat[0] = torch.nextafter(flat[0], torch.tensor(math.inf, dtype=flat.dtype))
        return out

    monkeypatch.setattr(lorazoo, "unmerge", unmerge_one_ulp_off)
    with pytest.raises(AssertionError, match="merge → unmerge: .* differs from the original in 1 of"):
        run("toy_ok", "unmerge_exact")
