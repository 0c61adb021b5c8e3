"""Whole modules trained with an adapter (``lorazoo.modules_to_save``): which copy runs, training,
save / load in both formats, eject, merge, several adapters, refusals, and all-or-nothing under an
interrupt at every checkpoint of every operation that changes them. The PEFT round trip on a tiny
BertForSequenceClassification runs against the installed PEFT."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

import lorazoo
from lorazoo import AdapterFileError, LorazooError, RoutingError, TargetError, peft_format
from lorazoo.cli import main
from lorazoo.engine import _interrupt, exact
from lorazoo.engine.inject import hosts
from lorazoo.trained import TrainedModules, wrappers


class Interrupt(KeyboardInterrupt):
    pass


class Head(nn.Module):
    """A module with a child, saved whole in these tests."""

    def __init__(self, d_out: int = 4):
        super().__init__()
        self.proj = nn.Linear(12, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * 2.0


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), Head()).eval()


X = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))


def out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def nudge(model: nn.Module, seed: int = 1) -> nn.Module:
    """Move every trainable tensor (adapters and copies) away from its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def adapted(copies: bool = True) -> nn.Module:
    model = base_model()
    lorazoo.inject(model, "lora", targets=["0", "2"], r=2, alpha=4)
    if copies:
        lorazoo.modules_to_save(model, ["4"])
    return nudge(model)


def snapshot(model: nn.Module) -> tuple:
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [(p, h.active, h.merged is not None) for p, h in hosts(model)],
        [(p, w.active, sorted(w.parked()), list(w.copies)) for p, w in wrappers(model)],
        out(model),
    )


def assert_same(before: tuple, model: nn.Module, what: str) -> None:
    now = snapshot(model)
    assert now[0] == before[0], f"{what}: modules differ"
    assert now[1].keys() == before[1].keys(), f"{what}: state-dict keys differ"
    for k, v in before[1].items():
        assert torch.equal(now[1][k], v), f"{what}: {k} differs"
    assert now[2:5] == before[2:5], f"{what}: flags or adapter state differ"
    assert torch.equal(now[5], before[5]), f"{what}: outputs differ"


# --------------------------------------------------------------------------------------------
# Behaviour
# --------------------------------------------------------------------------------------------


def test_the_copy_runs_and_trains_while_the_original_stays():
    model = base_model()
    original = model[4]
    base_keys = list(model.state_dict())
    lorazoo.inject(model, "lora", targets=["0", "2"], r=2)
    lorazoo.modules_to_save(model, "4")
    assert isinstance(model[4], TrainedModules) and model[4].original is original
    assert lorazoo.trained_modules(model) == {"4": ["default"]}
    # the base's keys are unchanged; the copy lives under <module>.modules_to_save.<adapter>
    keys = list(model.state_dict())
    assert [k for k in keys if ".adapters." not in k and ".modules_to_save." not in k] == base_keys
    assert "4.modules_to_save.default.proj.weight" in keys
    frozen = {k: v.clone() for k, v in original.state_dict().items()}
    opt = torch.optim.SGD(lorazoo.param_groups(model, lr=0.1))
    for _ in range(3):
        loss = model(X).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in original.state_dict().items():
        assert torch.equal(v, frozen[k]), "the original module was trained"
    twin = model[4].copies["default"]
    assert not torch.equal(twin.proj.weight, frozen["proj.weight"])
    # the forward is the copy's: the original module on the same hidden input gives other values
    with torch.no_grad():
        h = model[3](model[2](model[1](model[0](X))))
        assert torch.equal(model(X), twin(h))
        assert not torch.equal(model(X), original(h))


def test_save_load_both_formats_restore_the_copies(tmp_path):
    model = adapted()
    y = out(model)
    for path, fmt in ((tmp_path / "a.safetensors", "lorazoo"), (tmp_path / "peft", "peft")):
        lorazoo.save(model, path, format=fmt)
        fresh = base_model()
        lorazoo.load(fresh, path)
        assert torch.equal(out(fresh), y), fmt
        assert lorazoo.trained_modules(fresh) == {"4": ["default"]}
        # without the copies the saved model would not give these outputs
        lorazoo.eject(fresh)
        assert not torch.equal(out(fresh), y)


def test_load_into_the_existing_adapter_replaces_the_copies(tmp_path):
    model = adapted()
    lorazoo.save(model, tmp_path / "a.safetensors")
    other = adapted()
    nudge(other, seed=5)
    assert not torch.equal(out(other), out(model))
    lorazoo.load(other, tmp_path / "a.safetensors")
    assert torch.equal(out(other), out(model))


def test_load_refuses_a_file_whose_copies_do_not_fit(tmp_path):
    model = adapted()
    lorazoo.save(model, tmp_path / "with.safetensors")
    plain = adapted(copies=False)
    snap = snapshot(plain)
    with pytest.raises(AdapterFileError, match="carries trained copies of"):
        lorazoo.load(plain, tmp_path / "with.safetensors")  # the existing adapter has no copies
    assert_same(snap, plain, "refused load")
    wider = base_model()
    wider[4] = Head(5)
    snap = snapshot(wider)
    with pytest.raises(AdapterFileError, match="shape"):
        lorazoo.load(wider, tmp_path / "with.safetensors")
    assert_same(snap, wider, "refused load")


def test_eject_puts_the_original_module_object_back():
    model = base_model()
    original, y0 = model[4], out(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    lorazoo.inject(model, "lora", targets=["0", "2"], r=2)
    lorazoo.modules_to_save(model, ["4"])
    nudge(model)
    lorazoo.eject(model)
    assert model[4] is original
    assert torch.equal(out(model), y0)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_merge_and_unmerge_leave_the_copies_alone():
    model = adapted()
    y = out(model)
    twin = {k: v.clone() for k, v in model[4].copies["default"].state_dict().items()}
    lorazoo.merge(model)
    torch.testing.assert_close(out(model), y, rtol=1e-5, atol=1e-6)
    for k, v in model[4].copies["default"].state_dict().items():
        assert torch.equal(v, twin[k])
    lorazoo.unmerge(model)
    assert torch.equal(out(model), y)


def test_two_adapters_each_with_a_copy():
    model = adapted()
    lorazoo.inject(model, "lora", targets=["0"], r=2, name="b")
    lorazoo.modules_to_save(model, ["4"], name="b")
    nudge(model, seed=2)
    assert lorazoo.trained_modules(model) == {"4": ["default", "b"]}
    with pytest.raises(RoutingError, match=r"active adapters \['default', 'b'\] each carry"):
        model(X)
    lorazoo.set_active(model, "b")
    y_b = out(model)
    twin_b = model[4].copies["b"]
    assert all(p.requires_grad for p in twin_b.parameters())
    assert not any(p.requires_grad for p in model[4].copies["default"].parameters())  # parked
    lorazoo.set_active(model, "default")
    y_a = out(model)
    assert not torch.equal(y_a, y_b)
    assert all(p.requires_grad for p in model[4].copies["default"].parameters())
    with lorazoo.disabled(model):  # the base alone: original module, no adapter
        assert torch.equal(out(model), out(base_model()))
    assert torch.equal(out(model), y_a)
    lorazoo.eject(model, "default")
    assert lorazoo.trained_modules(model) == {"4": ["b"]}
    lorazoo.set_active(model, "b")
    assert torch.equal(out(model), y_b)


def test_merge_and_unload_keeps_the_active_copy():
    model = adapted()
    y = out(model)
    twin = model[4].copies["default"]
    lorazoo.merge_and_unload(model)
    assert model[4] is twin and type(model[0]) is nn.Linear
    assert not wrappers(model) and not hosts(model)
    torch.testing.assert_close(out(model), y, rtol=1e-5, atol=1e-6)
    assert all(p.requires_grad for p in model.parameters())  # as before the injection


def test_merge_and_unload_refuses_two_active_copies():
    model = adapted()
    lorazoo.inject(model, "lora", targets=["0"], r=2, name="b")
    lorazoo.modules_to_save(model, ["4"], name="b")
    lorazoo.set_active(model, ["default", "b"])
    modules = [(n, type(m)) for n, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RoutingError, match="each carry a trained copy"):
        lorazoo.merge_and_unload(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(h.merged for _, h in hosts(model))


@pytest.mark.parametrize(
    ("targets", "error", "match"),
    [
        (["0"], TargetError, "carries low-rank adapters"),
        (["nothing"], TargetError, "no module of the model is named"),
        ([""], TargetError, "must be module names"),
        ([], TargetError, "must be module names"),
    ],
)
def test_refusals_leave_the_model_unchanged(targets, error, match):
    model = adapted(copies=False)
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        lorazoo.modules_to_save(model, targets)
    assert_same(snap, model, "refused")


def test_refuses_a_module_containing_adapters_and_an_unknown_adapter():
    model = base_model()
    lorazoo.inject(model, "lora", targets=["proj"], r=2)
    with pytest.raises(TargetError, match="contains"):
        lorazoo.modules_to_save(model, ["4"])
    with pytest.raises(LorazooError, match="no adapter named 'x'"):
        lorazoo.modules_to_save(model, ["2"], name="x")
    lorazoo.modules_to_save(model, ["2"])
    with pytest.raises(LorazooError, match="already has a trained copy"):
        lorazoo.modules_to_save(model, ["2"])


def test_base_state_dict_leaves_out_adapters_and_copies():
    model = adapted()
    assert lorazoo.base_state_dict(model).keys() == base_model().state_dict().keys()


# --------------------------------------------------------------------------------------------
# All or nothing
# --------------------------------------------------------------------------------------------


class Counter:
    def __init__(self, fail_at: int | None = None):
        self.calls = 0
        self.fail_at = fail_at

    def __call__(self) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise Interrupt(f"checkpoint {self.calls}")


def every_checkpoint(monkeypatch, make, op, done) -> None:
    """Run ``op`` on ``make()`` interrupted at each of its checkpoints (the model must be
    unchanged each time), then uninterrupted (``done`` checks the result)."""
    monkeypatch.setattr(exact, "_CHUNK_BYTES", 4 * 12 * 3)
    clean = Counter()
    model = make()
    monkeypatch.setattr(_interrupt, "checkpoint", clean)
    op(model)
    done(model)
    assert clean.calls >= 3, "too few checkpoints to test"
    monkeypatch.setattr(_interrupt, "checkpoint", lambda: None)
    model = make()
    for k in range(1, clean.calls + 1):
        before = snapshot(model)
        monkeypatch.setattr(_interrupt, "checkpoint", Counter(k))
        with pytest.raises(Interrupt):
            op(model)
        assert_same(before, model, f"interrupted at checkpoint {k}")
    monkeypatch.setattr(_interrupt, "checkpoint", lambda: None)
    op(model)
    done(model)


def test_interrupted_modules_to_save_changes_nothing(monkeypatch):
    def make():
        model = base_model()
        lorazoo.inject(model, "lora", targets=["0"], r=2)
        lorazoo.inject(model, "lora", targets=["0"], r=2, name="b")
        lorazoo.modules_to_save(model, ["2"], name="b")  # a wrapper already there for "2"
        lorazoo.set_active(model, "default")
        return nudge(model)

    def done(m):
        assert lorazoo.trained_modules(m) == {"2": ["b", "default"], "4": ["default"]}

    every_checkpoint(monkeypatch, make, lambda m: lorazoo.modules_to_save(m, ["2", "4"]), done)


def test_interrupted_eject_changes_nothing(monkeypatch):
    def done(m):
        assert not wrappers(m) and not hosts(m)
        assert torch.equal(out(m), out(base_model()))

    every_checkpoint(monkeypatch, lambda: lorazoo.merge(adapted()), lorazoo.eject, done)


def test_interrupted_eject_of_one_adapter_changes_nothing(monkeypatch):
    def make():
        model = adapted()
        lorazoo.inject(model, "lora", targets=["0"], r=2, name="b")
        lorazoo.modules_to_save(model, ["4"], name="b")
        lorazoo.set_active(model, "b")
        return model

    def done(m):
        assert lorazoo.trained_modules(m) == {"4": ["b"]}

    every_checkpoint(monkeypatch, make, lambda m: lorazoo.eject(m, "default"), done)


def test_interrupted_load_changes_nothing(monkeypatch, tmp_path):
    source = adapted()
    lorazoo.save(source, tmp_path / "a.safetensors")

    def done(m):
        assert torch.equal(out(m), out(source))

    every_checkpoint(monkeypatch, base_model, lambda m: lorazoo.load(m, tmp_path / "a.safetensors"), done)


def test_interrupted_merge_and_unload_changes_nothing(monkeypatch):
    y = out(adapted())

    def done(m):
        assert not wrappers(m) and not hosts(m)
        torch.testing.assert_close(out(m), y, rtol=1e-5, atol=1e-6)

    every_checkpoint(monkeypatch, adapted, lorazoo.merge_and_unload, done)


@pytest.mark.parametrize("fail_at", [1, 2])
def test_interrupted_set_active_changes_nothing(monkeypatch, fail_at):
    model = base_model()
    lorazoo.inject(model, "lora", targets=["0"], r=2)
    lorazoo.inject(model, "lora", targets=["0"], r=2, name="b")
    lorazoo.modules_to_save(model, ["2", "4"], name="b")
    lorazoo.modules_to_save(model, ["2"])
    lorazoo.set_active(model, "b")
    nudge(model)
    before = snapshot(model)
    real = TrainedModules.set_active
    calls = []

    def fail(self, *a, **k):
        calls.append(1)
        if len(calls) == fail_at:  # the wrappers before this one have already followed
            raise Interrupt("in a wrapper")
        real(self, *a, **k)

    monkeypatch.setattr(TrainedModules, "set_active", fail)
    with pytest.raises(Interrupt):
        lorazoo.set_active(model, "default")
    assert len(calls) == fail_at
    assert_same(before, model, f"set_active interrupted in wrapper {fail_at}")


# --------------------------------------------------------------------------------------------
# Against the installed PEFT: a BERT classifier
# --------------------------------------------------------------------------------------------


def _bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def _train(model: nn.Module, params) -> None:
    g = torch.Generator().manual_seed(4)
    opt = torch.optim.Adam(params, lr=2e-2)
    model.train()
    for _ in range(5):
        ids = torch.randint(0, 50, (4, 9), generator=g)
        labels = torch.randint(0, 3, (4,), generator=g)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


IDS = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(8))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_peft_made_classifier_loads_with_peft_logits(tmp_path):
    peft = pytest.importorskip("peft")
    base = _bert()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    _train(pm, [p for p in pm.parameters() if p.requires_grad])
    want = _logits(pm)
    pm.save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(base)
    lorazoo.load(model, tmp_path / "peft")
    assert lorazoo.trained_modules(model) == {"classifier": ["default"]}
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-6)
    assert (_logits(base) - want).abs().max() > 1e-3  # the trained head and adapter matter


def test_lorazoo_classifier_loads_into_peft_with_lorazoo_logits(tmp_path):
    peft = pytest.importorskip("peft")
    base = _bert()
    model = copy.deepcopy(base)
    lorazoo.inject(model, "lora", targets=["query", "value"], r=4, alpha=8)
    lorazoo.modules_to_save(model, ["classifier"])
    _train(model, lorazoo.param_groups(model, lr=2e-2))
    want = _logits(model)
    lorazoo.save(model, tmp_path / "out", format="peft")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    torch.testing.assert_close(_logits(pm), want, rtol=1e-5, atol=1e-6)
    assert (_logits(base) - want).abs().max() > 1e-3


def test_a_base_checkpoint_loads_into_a_model_with_copies():
    model = adapted()
    y = out(model)
    result = model.load_state_dict(base_model().state_dict())  # strict
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(out(model), y)  # the base was already these tensors; copies untouched


def test_route_refuses_a_model_with_copies():
    model = adapted()
    with pytest.raises(RoutingError, match="modules saved whole"):
        with lorazoo.route(model, ["default"] * 5):
            model(X)


# --------------------------------------------------------------------------------------------
# PEFT key mapping, as a property
# --------------------------------------------------------------------------------------------

_part = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True).filter(
    lambda s: not s.startswith(("lora_", "vera_"))
)


@given(
    saved=st.dictionaries(
        st.lists(_part, min_size=1, max_size=3).map(".".join),
        st.lists(st.lists(_part, min_size=1, max_size=2).map(".".join), min_size=1, max_size=3, unique=True),
        min_size=1,
        max_size=3,
    )
)
@example(saved={"classifier": ["weight", "bias"], "bert.pooler.dense": ["weight"]})
@example(saved={"a": ["w"], "a.b": ["w"]})  # nested
@example(saved={"t": ["w"], "s.t.w": ["x"]})  # "s.t" ends in ".t"
def test_saved_modules_written_for_peft_read_back_the_same(saved):
    """Whole saved modules written into PEFT's keys come back as the same modules and tensor
    names; a set that PEFT's name matching would take apart (a shorter path selected by one of
    the entries) is refused instead."""
    paths = sorted(saved)

    def selected(q: str) -> bool:
        return any(q == n or q.endswith("." + n) for n in paths)

    ambiguous = any(selected(".".join(p.split(".")[:i])) for p in paths for i in range(1, p.count(".") + 1))
    tensors = {"m.lora_A": torch.zeros(2, 3), "m.lora_B": torch.zeros(3, 2)}
    for p, keys in saved.items():
        for k in keys:
            tensors[f"__modules__.{p}.{k}"] = torch.full((2,), float(len(k)))
    modules = {"m": {"kind": "linear"}}
    if ambiguous:
        with pytest.raises(LorazooError, match="no PEFT form"):
            peft_format.peft_files("lora", {"r": 2, "alpha": 4.0}, modules, tensors, saved)
        return
    cfg, out = peft_format.peft_files("lora", {"r": 2, "alpha": 4.0}, modules, tensors, saved)
    assert cfg["modules_to_save"] == paths
    got, got_tensors = peft_format._saved_modules("where", cfg["modules_to_save"], dict(out))
    assert got == {p: sorted(k) for p, k in saved.items()}
    assert got_tensors.keys() == {k for k in tensors if k.startswith("__modules__.")}
    for key, t in got_tensors.items():
        assert torch.equal(t, tensors[key])


# --------------------------------------------------------------------------------------------
# inspect and convert carry whole saved modules (the PEFT-made fixture; no PEFT needed)
# --------------------------------------------------------------------------------------------

FIXTURE = Path(__file__).parent / "data" / "peft" / "lora_modules_to_save"


def _fixture_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 4))
    model.load_state_dict(load_file(FIXTURE / "base.safetensors"))
    return model.eval()


def test_inspect_shows_the_saved_module(capsys):
    assert main(["inspect", str(FIXTURE)]) == 0
    text = capsys.readouterr().out
    assert "saved whole: 4  bias 4, weight 4×12" in text


def test_convert_both_ways_keeps_the_saved_module(tmp_path):
    expected = load_file(FIXTURE / "expected.safetensors")
    assert main(["convert", str(FIXTURE), str(tmp_path / "a.safetensors"), "--to", "lorazoo"]) == 0
    assert main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "back"), "--to", "peft"]) == 0
    for path in (tmp_path / "a.safetensors", tmp_path / "back"):
        model = _fixture_model()
        lorazoo.load(model, path)
        assert lorazoo.trained_modules(model) == {"4": ["default"]}
        with torch.no_grad():
            torch.testing.assert_close(model(expected["input"]), expected["output"], rtol=1e-5, atol=1e-6)
