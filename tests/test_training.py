"""Every registered variant learns, through the reference training loop.

The problem: a frozen base ``nn.Linear`` ``W`` (16 × 16, with bias) and targets
``y = (W + ΔW*)·x + b`` where ``ΔW* = U·V`` has rank 2, on 64 fixed inputs. Each variant is
injected with its own defaults (``config_class`` and ``example_config``, so VeRA gets its rank
256) and trained with AdamW at its ``recommended_lr``, using ``lorazoo.param_groups``,
``lorazoo.extra_loss`` and ``lorazoo.after_step`` exactly as the README's quickstart does.

Then LoRA+ (docs/spec/variants.md §4): with λ = 16 it reaches a target loss in fewer steps than LoRA at the
same base learning rate. Everything is seeded and runs on one thread, so the numbers below are
reproducible; they were measured with this file's ``fit``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import lorazoo

VARIANTS = lorazoo.variants()

D, RANK_STAR, N = 16, 2, 64

# Steps and the loss every variant must reach, as a fraction of its starting loss. Measured at
# seed 0 after 400 steps (fraction of the start): loraplus 5e-10, rslora 2e-4, lora 1.1e-3,
# vera 0.017, dora 0.029, olora 0.069. OLoRA cannot go much lower: its adapter must also carry
# the rank-8 part of W that it moved out of the base, so it fits a rank-10 update with rank 8.
STEPS = 400
REACH = 0.2

# LoRA against LoRA+: steps to bring the loss to 1 % of its start, at LoRA's recommended rate.
# Measured over seeds 0-5: LoRA 258-406 steps, LoRA+ 94-132, a ratio of 0.26-0.40.
TARGET = 0.01
MAX_STEPS = 1000
FASTER = 0.6


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: the reductions then run in one order, whatever the machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def problem(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A model holding one frozen-to-be linear layer ``proj``, inputs, and targets from a rank-2
    perturbation of its weight. Entries of ``W`` and ``ΔW*`` are both about ``1/√D``."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(D, D)
    with torch.no_grad():
        base.weight.copy_(torch.randn(D, D, generator=g) / D**0.5)
        base.bias.copy_(torch.randn(D, generator=g) / 10)
    delta = torch.randn(D, RANK_STAR, generator=g) @ torch.randn(RANK_STAR, D, generator=g)
    delta /= (RANK_STAR * D) ** 0.5
    x = torch.randn(N, D, generator=g)
    y = x @ (base.weight.detach() + delta).T + base.bias.detach()
    return nn.Sequential(OrderedDict(proj=base)), x, y


def adapt(model: nn.Module, variant: str, seed: int, **hyper: object) -> float:
    """Inject ``variant`` with its defaults (plus ``hyper``) and return its recommended rate."""
    cls = lorazoo.variant(variant)
    torch.manual_seed(seed)  # the adapters' random initialisation
    lorazoo.inject(model, variant, targets=["proj"], **{**cls.example_config, **hyper})
    return cls.recommended_lr


def fit(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int, stop_below: float = 0.0
) -> list[float]:
    """The reference training loop. Returns the loss before each step; stops early once the
    loss is at or below ``stop_below`` (that loss is the last one returned)."""
    optimizer = torch.optim.AdamW(lorazoo.param_groups(model, lr=lr))
    losses: list[float] = []
    model.train()
    for step in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        if losses[-1] <= stop_below:
            break
        extra = lorazoo.extra_loss(model)  # variants that add a loss term (else None)
        (loss if extra is None else loss + extra).backward()
        optimizer.step()
        lorazoo.after_step(model, step)  # variants with per-step work
        optimizer.zero_grad()
    return losses


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_fits_a_low_rank_update(variant: str) -> None:
    model, x, y = problem(seed=0)
    if getattr(lorazoo.variant(variant), "base_storage", "dense") == "nf4":
        lorazoo.quantize(model, targets=["proj"])  # the base QLoRA trains on (inject would do the same)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lr = adapt(model, variant, seed=0)
    losses = fit(model, x, y, lr, STEPS)
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    start, end = losses[0], losses[-1]
    assert start > 0.3, "the problem should start far from its solution"
    assert end <= REACH * start, (
        f"{variant}: loss {start:.4g} -> {end:.4g} ({end / start:.3g} of the start) after {STEPS} "
        f"steps at lr={lr:g}; expected at most {REACH} of the start"
    )
    assert min(losses) < losses[STEPS // 2], f"{variant}: no progress in the second half"
    # Training reached only the adapter: the original base comes back bit for bit.
    lorazoo.eject(model)
    after = model.state_dict()
    assert after.keys() == base.keys()
    for k, v in base.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), f"{variant}: base tensor {k} changed"
    assert all(p.grad is None for p in model.proj.parameters())
    assert model.proj.bias is not None and model.proj.bias.grad is None


def steps_to_target(variant: str, seed: int, lr: float) -> int:
    model, x, y = problem(seed)
    adapt(model, variant, seed=seed)
    with torch.no_grad():
        start = nn.functional.mse_loss(model(x), y).item()
    losses = fit(model, x, y, lr, MAX_STEPS, stop_below=TARGET * start)
    assert losses[-1] <= TARGET * start, f"{variant} did not reach {TARGET} of its start in {MAX_STEPS} steps"
    return len(losses) - 1


@pytest.mark.skipif(not {"lora", "loraplus"} <= set(VARIANTS), reason="needs the lora and loraplus variants")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loraplus_reaches_the_loss_in_fewer_steps_than_lora(seed: int) -> None:
    lr = lorazoo.variant("lora").recommended_lr
    assert lorazoo.variant("loraplus").config_class().lr_ratio == 16.0
    lora = steps_to_target("lora", seed, lr)
    plus = steps_to_target("loraplus", seed, lr)
    assert plus <= FASTER * lora, f"seed {seed}: LoRA+ took {plus} steps, LoRA {lora} (lr={lr:g})"
