"""Mixed batches (``lorazoo.route``): rows of one batch through different adapters.

The conformance suite checks, for every registered variant, that routed rows equal the rows of
single-adapter runs; these tests cover the engine's side: a whole Llama-like model with an
embedding, gradients, layers without the routed adapter, and every refusal leaving the model as
it was.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorazoo
from lorazoo.bench.model import LlamaConfig, LlamaLike
from lorazoo.engine.inject import hosts
from lorazoo.testing import perturb

TINY = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, max_seq_len=16
)


def llama() -> LlamaLike:
    torch.manual_seed(0)
    model = LlamaLike(TINY)
    lorazoo.inject(model, "lora", targets="all-linear", r=4, name="task_a")
    lorazoo.inject(model, "dora", targets=["q_proj", "v_proj"], r=2, name="task_b")
    lorazoo.inject(model, "loraplus", targets=nn.Embedding, r=2, name="task_c")
    perturb(model, 1)
    return model


def single(model: nn.Module, name: str | None, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if name is None:
            with lorazoo.disabled(model):
                return model(ids)
        saved = {p: h.active for p, h in hosts(model)}
        lorazoo.set_active(model, [name])
        try:
            return model(ids)
        finally:
            for p, h in hosts(model):
                h.set_active(saved[p])


def test_routed_llama_rows_equal_single_adapter_runs():
    model = llama().eval()
    ids = torch.randint(0, TINY.vocab_size, (5, 12), generator=torch.Generator().manual_seed(2))
    names = ["task_a", "task_b", None, "task_c", "task_a"]
    with torch.no_grad(), lorazoo.route(model, names):
        routed = model(ids)
    for row, name in enumerate(names):
        ref = single(model, name, ids)[row]
        scale = float(ref.abs().max())
        assert torch.allclose(routed[row], ref, rtol=1e-5, atol=1e-5 * scale), (row, name)
    # rows really differ by adapter (the check above is not vacuous)
    base = single(model, None, ids)
    for row, name in enumerate(names):
        if name is not None:
            assert (routed[row] - base[row]).abs().max() > 1e-4, (row, name)
    assert all(h._routes is None for _, h in hosts(model))


def test_gradients_reach_only_the_adapters_of_the_rows_in_the_loss():
    model = llama().train()
    ids = torch.randint(0, TINY.vocab_size, (3, 8), generator=torch.Generator().manual_seed(3))
    with lorazoo.route(model, ["task_a", "task_b", "task_c"]):
        out = model(ids)
    out[[0, 2]].square().mean().backward()  # rows of task_a (linear layers), task_c (embedding)
    for path, host in hosts(model):
        for name in ("task_a", "task_c"):
            if name in host.adapters:
                assert host.adapters[name].lora_B.grad.abs().sum() > 0, (path, name)
        if "task_b" in host.adapters:
            for p in host.adapters["task_b"].parameters():
                assert p.grad is None or not p.grad.any(), f"{path}: task_b got a gradient"
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." not in n)


def test_a_layer_without_the_routed_adapter_gives_the_base_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    lorazoo.inject(model, "lora", targets=["0"], r=2, name="only_first")
    lorazoo.inject(model, "lora", targets=["0", "1"], r=2, name="both")
    perturb(model, 0)
    x = torch.randn(2, 6)
    with torch.no_grad(), lorazoo.route(model, ["only_first", "both"]):
        routed = model(x)
    for row, name in enumerate(["only_first", "both"]):
        assert torch.allclose(routed[row], single(model, name, x)[row], rtol=1e-6, atol=1e-6)


def model_with_adapters() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    lorazoo.inject(model, "lora", r=2, name="task_a")
    return model


def test_refusals_change_nothing():
    model = model_with_adapters()
    x = torch.randn(3, 6)
    with pytest.raises(lorazoo.RoutingError, match="did you mean 'task_a'"):
        with lorazoo.route(model, ["task_a", "tsk_a", None]):
            pass
    with pytest.raises(lorazoo.RoutingError, match="empty"):
        with lorazoo.route(model, []):
            pass
    with pytest.raises(lorazoo.RoutingError, match="row 1"):
        with lorazoo.route(model, ["task_a", 3, None]):
            pass
    with pytest.raises(lorazoo.RoutingError, match="no lorazoo adapters"):
        with lorazoo.route(nn.Sequential(nn.Linear(2, 2)), [None]):
            pass
    with lorazoo.route(model, ["task_a", None, None]):
        with pytest.raises(lorazoo.RoutingError, match="do not nest"):
            with lorazoo.route(model, ["task_a", None, None]):
                pass
        with pytest.raises(lorazoo.MergeError, match="routed"):
            lorazoo.merge(model)
        assert model[0].merged is None
    lorazoo.merge(model)
    with pytest.raises(lorazoo.MergeError, match="unmerge"):
        with lorazoo.route(model, ["task_a", None, None]):
            pass
    lorazoo.unmerge(model)
    assert model[0]._routes is None
    with torch.no_grad():
        assert torch.equal(model(x), single(model, "task_a", x))


def test_a_batch_of_the_wrong_size_is_refused_and_routing_ends_with_the_block():
    model = model_with_adapters()
    with pytest.raises(lorazoo.RoutingError, match="3 rows"):
        with lorazoo.route(model, ["task_a", None, None]):
            model(torch.randn(4, 6))
    assert model[0]._routes is None
    with pytest.raises(lorazoo.RoutingError, match="shape"):
        with lorazoo.route(model, ["task_a"]):
            model(torch.randn(6))  # no batch dimension
    out = model(torch.randn(4, 6))  # routing is over: a batch of any size runs
    assert out.shape == (4, 5)


def test_training_with_dropout_routes_each_adapter_on_its_own_rows():
    """With dropout active the adapters cannot share one product (each draws its own mask):
    every adapter still gets a gradient from its rows only, and base rows stay the base."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    for name in ("task_a", "task_b"):
        lorazoo.inject(model, "lora", r=2, dropout=0.5, name=name)
    perturb(model, 0)
    model.train()
    x = torch.randn(3, 6)
    with lorazoo.route(model, ["task_a", None, "task_b"]):
        out = model(x)
    with torch.no_grad():
        assert torch.equal(out[1], nn.functional.linear(x, model[0].weight, model[0].bias)[1])
    out[2].sum().backward()
    host = model[0]
    assert host.adapters["task_b"].lora_B.grad.abs().sum() > 0
    assert not host.adapters["task_a"].lora_B.grad.any()


@pytest.mark.parametrize("variants", [("lora", "lora"), ("lora", "dora"), ("vera", "rslora")])
def test_a_batch_sorted_by_adapter_equals_the_same_rows_interleaved(variants):
    """Rows sorted by adapter are routed through slices, interleaved rows through gathers: the
    same rows give the same outputs (within rounding) either way."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 8))
    for i, v in enumerate(variants):
        lorazoo.inject(model, v, r=4, name=f"t{i}")
    perturb(model, 2)
    model.eval()
    x = torch.randn(6, 5, 12)
    order = [0, 3, 1, 4, 2, 5]  # interleaved position -> sorted row
    sorted_names = ["t0", "t0", "t0", "t1", "t1", None]
    with torch.no_grad():
        with lorazoo.route(model, sorted_names):
            by_slice = model(x)
        with lorazoo.route(model, [sorted_names[i] for i in order]):
            by_gather = model(x[order])
        with lorazoo.route(model, sorted_names):
            assert all(r.span is not None for r in model[0]._routes[1])
    scale = float(by_slice.abs().max())
    assert torch.allclose(by_gather, by_slice[order], rtol=1e-6, atol=1e-6 * scale)
    for row, name in enumerate(sorted_names):
        assert torch.allclose(by_slice[row], single(model, name, x)[row], rtol=1e-6, atol=1e-6 * scale)
