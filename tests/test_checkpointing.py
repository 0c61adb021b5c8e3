"""Activation checkpointing on a frozen base, for every registered variant: reentrant
(``use_reentrant=True``, with :func:`lorazoo.enable_input_grads`) and non-reentrant
checkpointing give the gradients of the model without checkpointing.

Checkpointing recomputes each block's forward with the same operations on the same values; what
may differ is the order in which the gradient reaching a block's output is summed (the residual
path and the block's own, inside the reentrant backward or in the outer one), a few roundings of
the largest term. Gradients are compared within ``64·u·max|∂|`` (fp32, u = 2⁻²⁴), far below the
difference a missing or misrouted gradient makes.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lorazoo
from lorazoo.engine.inject import iter_adapters
from lorazoo.testing import perturb

VARIANTS = sorted(lorazoo.variants())


def _inject(model: nn.Module, variant: str, targets) -> None:
    cls = lorazoo.variant(variant)
    lorazoo.inject(model, variant, targets=targets, **{"r": 4, "alpha": 8, **cls.example_config})
    perturb(model, 1)
    model.train()


def _adapter_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        f"{path}.{name}.{k}": p.grad
        for path, name, a in iter_adapters(model)
        for k, p in a.named_parameters()
        if p.requires_grad
    }


def _assert_same(got: dict, ref: dict, what: str) -> None:
    assert ref and got.keys() == ref.keys()
    assert all(g is not None for g in ref.values())
    missing = [k for k, g in got.items() if g is None]
    assert not missing, f"{what}: no gradient for {missing}"
    for k, g in got.items():
        err, top = float((g - ref[k]).abs().max()), float(ref[k].abs().max())
        assert err <= 64 * 2.0**-24 * top, f"{what}: {k} differs by {err:.3g} (max |∂| {top:.3g})"


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.nn.functional.silu(self.up(h)))


class Net(nn.Module):
    """A plain module: embedding (or float input), checkpointed blocks, head."""

    def __init__(self, embed: bool, d: int = 12, vocab: int = 20):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, d) if embed else None
        self.blocks = nn.ModuleList([Block(d) for _ in range(2)])
        self.head = nn.Linear(d, vocab)
        self.reentrant: bool | None = None  # None: no checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.embed is not None else x
        for block in self.blocks:
            h = block(h) if self.reentrant is None else checkpoint(block, h, use_reentrant=self.reentrant)
        return self.head(h)


def _net_grads(model: Net, x: torch.Tensor, reentrant: bool | None) -> dict:
    model.zero_grad(set_to_none=True)
    model.reentrant = reentrant
    model(x).square().mean().backward()
    return {k: None if g is None else g.clone() for k, g in _adapter_grads(model).items()}


@pytest.mark.parametrize("embed", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_plain_module(variant, embed):
    model = Net(embed)
    _inject(model, variant, [nn.Linear])
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 20, (3, 5), generator=g) if embed else torch.randn(3, 5, 12, generator=g)
    ref = _net_grads(model, x, None)
    _assert_same(_net_grads(model, x, False), ref, "non-reentrant")
    # Reentrant without the helper: the blocks' adapters get no gradient (the head's does).
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        without = _net_grads(model, x, True)
    first = [k for k in ref if k.startswith("blocks.0.up.")]
    assert first and all(without[k] is None for k in first)
    handles = lorazoo.enable_input_grads(model)
    assert len(handles) == 1 and lorazoo.enable_input_grads(model)[0].id == handles[0].id
    _assert_same(_net_grads(model, x, True), ref, "reentrant")
    # the hook only marks activations: the eager model's gradients are unchanged
    _assert_same(_net_grads(model, x, None), ref, "with the hook, no checkpointing")
    for h in handles:
        h.remove()
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        without = _net_grads(model, x, True)
    assert all(without[k] is None for k in first)


def test_inference_is_untouched():
    """Under no_grad the hook does nothing: outputs are the very tensors a model without it
    returns, not requiring grad."""
    model = Net(embed=True)
    _inject(model, "lora", [nn.Linear])
    x = torch.randint(0, 20, (2, 4))
    with torch.no_grad():
        y0 = model(x)
    lorazoo.enable_input_grads(model)
    with torch.no_grad():
        y1 = model(x)
    assert not y1.requires_grad and torch.equal(y0, y1)


def _llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        use_cache=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _llama_grads(model, ids) -> dict:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {k: None if g is None else g.clone() for k, g in _adapter_grads(model).items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_llama(variant):
    """A small Hugging Face Llama, adapters on every projection. Reentrant checkpointing set up
    as older ``gradient_checkpointing_enable`` did (no input hook of its own) needs
    :func:`lorazoo.enable_input_grads`; non-reentrant, and the current
    ``gradient_checkpointing_enable`` (which adds its own hook), work as they are."""
    model = _llama()
    _inject(model, variant, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    ids = torch.randint(0, 48, (2, 7), generator=torch.Generator().manual_seed(3))
    ref = _llama_grads(model, ids)

    for reentrant in (False, True):
        model._set_gradient_checkpointing(
            enable=True, gradient_checkpointing_func=functools.partial(checkpoint, use_reentrant=reentrant)
        )
        assert model.model.layers[0].gradient_checkpointing
        if reentrant:
            with pytest.raises(RuntimeError, match="does not require grad"):
                _llama_grads(model, ids)
            handles = lorazoo.enable_input_grads(model)
            assert len(handles) == 1
        _assert_same(_llama_grads(model, ids), ref, f"use_reentrant={reentrant}")
        for h in handles if reentrant else ():
            h.remove()
    model.gradient_checkpointing_disable()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    _assert_same(_llama_grads(model, ids), ref, "gradient_checkpointing_enable(use_reentrant=True)")
