"""Every state change of the engine is all or nothing: interrupted at any chunk or layer boundary
(or at any line), on copies, casts, moves and inference tensors, the model is either fully in the
new state or bit for bit in the old one."""

from __future__ import annotations

import copy
import io
import os
import sys

import pytest
import torch
from torch import nn

import lorazoo
from lorazoo.engine import _interrupt, exact
from lorazoo.engine.inject import hosts

VARIANTS = lorazoo.variants()
DTYPES = [torch.float32, torch.bfloat16]


class Interrupt(KeyboardInterrupt):
    """The interrupt the tests inject (a KeyboardInterrupt, as Ctrl-C raises)."""


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 32), nn.Tanh(), nn.Linear(32, 16))
    return model.to(dtype)


def _base(variant: str, dtype: torch.dtype) -> nn.Module:
    """The base ``variant`` adapts: :func:`_model`, quantised to NF4 for a variant that asks for
    that base storage (QLoRA; its inject would quantise the same way, and eject leaves NF4)."""
    model = _model(dtype)
    if getattr(lorazoo.variant(variant), "base_storage", "dense") == "nf4":
        lorazoo.quantize(model, targets=nn.Linear)
    return model


def _adapted(variant: str, dtype: torch.dtype) -> nn.Module:
    model = _base(variant, dtype)
    cls = lorazoo.variant(variant)
    lorazoo.inject(model, variant, targets=nn.Linear, r=4, alpha=8, **cls.example_config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name and p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.2)
    return model.eval()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def _snapshot(model: nn.Module) -> tuple:
    """What a user can observe: module types, every tensor's bits, flags, and per host the merged
    adapters, base rewrites, active set and adapter names."""
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: _bits(v) for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [
            (
                p,
                h.merged.names if h.merged is not None else None,
                [pt.owner for pt in h.patches],
                h.active,
                list(h.adapters),
            )
            for p, h in hosts(model)
        ],
    )


def _difference(before: tuple, now: tuple) -> str | None:
    """What differs between two snapshots, or None."""
    if now[0] != before[0]:
        return "modules differ"
    if now[1].keys() != before[1].keys():
        return "state dict keys differ"
    for k in before[1]:
        if not torch.equal(now[1][k], before[1][k]):
            return f"{k} is not bit for bit as before"
    if now[2] != before[2]:
        return "requires_grad flags differ"
    if now[3] != before[3]:
        return "merge/rewrite/active state differs"
    return None


def _assert_same(before: tuple, model: nn.Module, what: str) -> None:
    diff = _difference(before, _snapshot(model))
    assert diff is None, f"{what}: {diff}"


class _Counter:
    """A replacement for ``checkpoint`` that counts calls and raises at call ``fail_at``."""

    def __init__(self, fail_at: int | None = None):
        self.calls = 0
        self.fail_at = fail_at

    def __call__(self) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise Interrupt(f"interrupt at checkpoint {self.calls}")


@pytest.fixture
def small_chunks(monkeypatch):
    """A few rows per chunk, so every layer has several chunk boundaries."""
    monkeypatch.setattr(exact, "_CHUNK_BYTES", 4 * 40 * 3)


def _every_checkpoint(monkeypatch, model_fn, op, check_interrupted, check_completed) -> int:
    clean = _Counter()
    model = model_fn()
    monkeypatch.setattr(_interrupt, "checkpoint", clean)
    op(model)
    calls = clean.calls
    monkeypatch.setattr(_interrupt, "checkpoint", lambda: None)
    check_completed(model)
    assert calls > 3, "the operation passes too few checkpoints to test"
    model = model_fn()
    for k in range(1, calls + 1):
        before = _snapshot(model)
        counter = _Counter(k)
        monkeypatch.setattr(_interrupt, "checkpoint", counter)
        try:
            op(model)
        except Interrupt:
            pass
        else:
            pytest.fail(f"no interrupt at checkpoint {k}: only {counter.calls} of {calls} were passed")
        check_interrupted(before, model, k)
    monkeypatch.setattr(_interrupt, "checkpoint", lambda: None)
    op(model)  # the interrupted operation can then be completed
    check_completed(model)
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_interrupt_at_every_checkpoint_of_merge_unmerge_eject(variant, dtype, monkeypatch, small_chunks):
    base = _base(variant, dtype)
    original = {k: _bits(v) for k, v in base.state_dict().items()}
    x = torch.randn(5, 24).to(dtype)

    def same_as(before, model, k, what):
        _assert_same(before, model, f"{what} interrupted at checkpoint {k}")

    # merge: interrupted, nothing is merged and every weight is as before
    ref = _adapted(variant, dtype)
    y_unmerged = ref(x)
    lorazoo.merge(ref)
    y_merged = ref(x)

    def merged_ok(model):
        assert all(h.merged is not None for _, h in hosts(model))
        assert torch.equal(model(x), y_merged)

    _every_checkpoint(
        monkeypatch,
        lambda: _adapted(variant, dtype),
        lorazoo.merge,
        lambda b, m, k: same_as(b, m, k, "merge"),
        merged_ok,
    )

    # unmerge: interrupted, every layer is still merged, with the merged bits
    def unmerged_ok(model):
        assert all(h.merged is None for _, h in hosts(model))
        assert torch.equal(model(x), y_unmerged)

    _every_checkpoint(
        monkeypatch,
        lambda: lorazoo.merge(_adapted(variant, dtype)),
        lorazoo.unmerge,
        lambda b, m, k: same_as(b, m, k, "unmerge"),
        unmerged_ok,
    )

    # eject of a merged model (OLoRA: with its base rewrite): interrupted, nothing changed
    def ejected_ok(model):
        assert not hosts(model)
        state = model.state_dict()
        assert state.keys() == original.keys()
        for k, v in original.items():
            assert torch.equal(_bits(state[k]), v), f"eject: {k} is not the original"

    _every_checkpoint(
        monkeypatch,
        lambda: lorazoo.merge(_adapted(variant, dtype)),
        lorazoo.eject,
        lambda b, m, k: same_as(b, m, k, "eject"),
        ejected_ok,
    )


@pytest.mark.parametrize("variant", ["lora", "olora"])
def test_interrupt_at_every_checkpoint_of_inject(variant, monkeypatch, small_chunks):
    """inject (OLoRA rewrites the base chunk by chunk) leaves the model untouched if interrupted."""

    def op(model):
        lorazoo.inject(model, variant, targets=nn.Linear, r=4)

    def done(model):
        assert len(hosts(model)) == 3

    _every_checkpoint(monkeypatch, _model, op, lambda b, m, k: _assert_same(b, m, f"inject at {k}"), done)


def _line_interrupts(model_fn, op, check_interrupted, limit: int | None = None) -> int:
    """Raise at the k-th line executed inside the engine, for every k of a clean run."""
    engine_dir = os.path.dirname(exact.__file__)

    def run(fail_at):
        count = 0

        def local(frame, event, arg):
            nonlocal count
            if event == "line":
                count += 1
                if count == fail_at:
                    raise Interrupt(f"interrupt at line {frame.f_code.co_filename}:{frame.f_lineno}")
            return local

        def global_(frame, event, arg):
            if frame.f_code.co_filename.startswith(engine_dir) and event == "call":
                return local
            return None

        model = model_fn()
        before = _snapshot(model)
        previous = sys.gettrace()  # a coverage tool's tracer is put back afterwards
        sys.settrace(global_)
        try:
            op(model)
            raised = False
        except Interrupt:
            raised = True
        finally:
            sys.settrace(previous)
        return count, model, before, raised

    total, _, _, raised = run(None)
    assert not raised and total > 20
    ks = range(1, total + 1) if limit is None else sorted({1 + (i * total) // limit for i in range(limit)})
    for k in ks:
        _, model, before, raised = run(k)
        assert raised
        check_interrupted(before, model, k)
    return total


@pytest.mark.parametrize("op_name", ["merge", "unmerge", "eject"])
def test_interrupt_at_every_engine_line(op_name, small_chunks):
    """A KeyboardInterrupt can arrive at any line, not only at checkpoints: LoRA (fp32), lines
    executed inside lorazoo.engine during the operation. Afterwards the model is in the old state
    or, when the change was complete, in the new one: never in between."""

    def fresh():
        m = _adapted("lora", torch.float32)
        return lorazoo.merge(m) if op_name in ("unmerge", "eject") else m

    op = getattr(lorazoo, op_name)

    def check(before, model, k):
        now = _snapshot(model)
        if _difference(before, now) is None:
            return  # the old state, bit for bit
        done = fresh()  # or else the complete new state (interrupted after the change was made)
        op(done)
        diff = _difference(_snapshot(done), now)
        assert diff is None, f"{op_name} interrupted at engine line {k}: neither old nor new state: {diff}"

    # every line takes minutes (it passes; LORAZOO_EVERY_LINE=1 runs it); by default 150 lines
    # spread evenly over the operation
    _line_interrupts(fresh, op, check, limit=None if os.environ.get("LORAZOO_EVERY_LINE") else 150)


# ---- inference mode ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["lora", "dora", "olora", "vera"])
def test_inference_mode_inject_then_merge_unmerge_eject(variant):
    """Adapters built under torch.inference_mode() (a serving setup) merge, unmerge and eject
    exactly, inside and outside inference mode; DoRA's forward works there."""
    model = _model()
    original = {k: _bits(v) for k, v in model.state_dict().items()}
    x = torch.randn(4, 24)
    cls = lorazoo.variant(variant)
    with torch.inference_mode():
        lorazoo.inject(model, variant, targets=nn.Linear, r=4, **cls.example_config)
        for name, p in model.named_parameters():
            if ".adapters." in name and p.is_floating_point():
                p.add_(0.1)
        y = model(x)
        assert y.shape == (4, 16)
        lorazoo.merge(model)
        y_merged = model(x)
        lorazoo.unmerge(model)
    assert (y - y_merged).abs().max() < 1e-4
    lorazoo.merge(model)  # outside inference mode
    lorazoo.unmerge(model)
    with torch.inference_mode():
        lorazoo.merge(model)
    lorazoo.eject(model)
    for k, v in model.state_dict().items():
        assert torch.equal(_bits(v), original[k]), k


def test_model_built_in_inference_mode_merges_and_ejects():
    """A base weight that is itself an inference tensor is written in inference mode."""
    with torch.inference_mode():
        model = _model()
        original = {k: _bits(v) for k, v in model.state_dict().items()}
        lorazoo.inject(model, "dora", targets=nn.Linear, r=4)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    lorazoo.merge(model)
    lorazoo.eject(model)
    for k, v in model.state_dict().items():
        assert torch.equal(_bits(v), original[k]), k


# ---- adapters changed while merged -------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_optimizer_step_while_merged_keeps_unmerge_exact(variant):
    model = _adapted(variant, torch.float32)
    keys = _model().state_dict().keys()
    base = {k: _bits(v) for k, v in model.state_dict().items() if k in keys}  # OLoRA: rewritten
    lorazoo.merge(model)
    params = [p for n, p in model.named_parameters() if ".adapters." in n and p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
        p.grad = torch.ones_like(p)
    torch.optim.SGD(params, lr=0.05).step()  # a step while merged
    lorazoo.unmerge(model)
    for k, v in base.items():
        assert torch.equal(_bits(model.state_dict()[k]), v), k


# ---- casts after a base rewrite ----------------------------------------------------------------


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize(
    "cast",
    [
        ("bf16", lambda m: m.to(torch.bfloat16), torch.bfloat16),
        ("half", lambda m: m.half(), torch.float16),
        ("double", lambda m: m.double(), torch.float64),
    ],
    ids=lambda c: c[0],
)
def test_olora_cast_then_eject_gives_the_cast_original(cast, merged):
    """After a cast, "exact" means the cast of the original weight, bit for bit."""
    _, fn, dtype = cast
    model = _model()
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lorazoo.inject(model, "olora", targets=nn.Linear, r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    if merged:
        lorazoo.merge(model.eval())
    fn(model)
    x = torch.randn(3, 24).to(dtype)
    model(x)  # the cast model runs
    if merged:
        lorazoo.unmerge(model)
    lorazoo.eject(model)
    for k, v in model.state_dict().items():
        assert v.dtype == dtype
        assert torch.equal(_bits(v), _bits(original[k].to(dtype))), k


def test_cast_of_a_merged_lora_model_unmerges_to_the_cast_original():
    model = _adapted("lora", torch.float32)
    original = {k: v.detach().clone() for k, v in _model().state_dict().items()}
    lorazoo.merge(model)
    model.to(torch.bfloat16)
    lorazoo.unmerge(model)
    for k, v in original.items():
        assert torch.equal(_bits(model.state_dict()[k]), _bits(v.to(torch.bfloat16))), k


# ---- copies, pickles, moves -------------------------------------------------------------------


def _deepcopy(m):
    return copy.deepcopy(m)


def _pickle(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _cast_round_trip(m):
    m.double()  # a cast and back: the merge is taken out and put back around each
    m.float()
    return m


def _new_storage(m):
    """What a move to another device and back does to the weights: same contents, new storage,
    fresh version counters."""
    for p in m.parameters():
        p.data = p.data.clone()
    return m


def _state_dict_reload(m):
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    m.load_state_dict(sd)  # same contents, new version counters
    return m


@pytest.mark.parametrize(
    "how", [_deepcopy, _pickle, _cast_round_trip, _new_storage, _state_dict_reload], ids=lambda f: f.__name__
)
@pytest.mark.parametrize("variant", ["lora", "dora", "olora"])
def test_copy_of_a_merged_model_unmerges_and_ejects(variant, how):
    model = _adapted(variant, torch.float32)
    original = {k: _bits(v) for k, v in _model().state_dict().items()}
    lorazoo.merge(model)
    c = how(model)
    lorazoo.unmerge(c)
    lorazoo.eject(c)
    for k, v in c.state_dict().items():
        assert torch.equal(_bits(v), original[k]), k


# ---- non-contiguous weights ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_weight_merges_and_unmerges_exactly(dtype):
    model = _model(dtype)
    lin = model[2]
    lin.weight = nn.Parameter(lin.weight.detach().t().contiguous().t())  # a transposed view
    assert not lin.weight.is_contiguous()
    original = {k: _bits(v) for k, v in model.state_dict().items()}
    lorazoo.inject(model, "dora", targets=nn.Linear, r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    x = torch.randn(3, 24).to(dtype)
    y = model.eval()(x)
    lorazoo.merge(model)
    assert (model(x).float() - y.float()).abs().max() < 0.1
    lorazoo.unmerge(model)
    assert model[2].merged is None and not model[2].weight.is_contiguous()
    lorazoo.eject(model)
    for k, v in model.state_dict().items():
        assert torch.equal(_bits(v), original[k]), k


# ---- tied weights -----------------------------------------------------------------------------


class Tied(nn.Module):
    """A tiny language model whose output head is the embedding (lm_head.weight is emb.weight)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 16)
        self.body = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 20, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.body(self.emb(ids))))


@pytest.mark.parametrize("targets", [["lm_head", "body"], ["emb"], ["emb", "lm_head"]])
def test_tied_weights_are_never_merged_silently(targets):
    model = Tied()
    before = {k: _bits(v) for k, v in model.state_dict().items()}
    lorazoo.inject(model, "lora", targets=targets, r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.2)
    model.eval()
    ids = torch.arange(12)
    y = model(ids)
    snap = _snapshot(model)
    with pytest.raises(lorazoo.MergeError, match=r"tied to \['(emb|lm_head)\.weight'\]"):
        lorazoo.merge(model)
    _assert_same(snap, model, "refused merge")
    assert torch.equal(model(ids), y)  # the unmerged forward is right and unchanged
    assert model.lm_head.weight is model.emb.weight
    lorazoo.eject(model)
    for k, v in model.state_dict().items():
        assert torch.equal(_bits(v), before[k]), k


def test_tied_weight_refused_by_a_base_rewriting_variant():
    model = Tied()
    before = _snapshot(model)
    with pytest.raises(lorazoo.ConfigError, match=r"'lm_head' is tied to \['emb\.weight'\]"):
        lorazoo.inject(model, "olora", targets=["lm_head"], r=4)
    _assert_same(before, model, "refused inject")
    lorazoo.inject(model, "olora", targets=["body"], r=4)  # an untied layer is fine


def test_untied_layers_of_a_tied_model_merge():
    model = Tied()
    lorazoo.inject(model, "lora", targets=["body"], r=4)
    with torch.no_grad():
        model.body.adapters["default"].lora_B.add_(0.2)
    model.eval()
    ids = torch.arange(12)
    y = model(ids)
    lorazoo.merge(model)
    assert (model(ids) - y).abs().max() < 1e-4
    lorazoo.unmerge(model)


def test_disjoint_views_of_one_buffer_are_not_ties():
    """Two layers whose weights are disjoint views of one buffer share storage but no element:
    both merge and unmerge exactly."""
    model = nn.Sequential(nn.Linear(8, 6, bias=False), nn.Linear(6, 4, bias=False))
    flat = torch.randn(6 * 8 + 4 * 6) * 0.1
    model[0].weight = nn.Parameter(flat[:48].view(6, 8))
    model[1].weight = nn.Parameter(flat[48:].view(4, 6))
    before = flat.clone()
    lorazoo.inject(model, "lora", targets=nn.Linear, r=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.3)
    lorazoo.merge(model.eval())
    assert not torch.equal(flat, before)
    lorazoo.unmerge(model)
    assert torch.equal(_bits(flat), _bits(before))
