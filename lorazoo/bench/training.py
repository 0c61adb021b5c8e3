"""The bench's training loop and evaluation: batches, the schedule, the per-step hooks.

:func:`train` is the one loop every run goes through (pre-training, adapters, full
fine-tuning), and the one place where lorazoo's per-step work is invoked for adapter runs:
``extra_loss`` is added to the loss, and ``lorazoo.attach`` hooks each variant's per-step work
(AdaLoRA's rank allocation) onto the optimizer for the run's length.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .backends import BenchError, next_token_loss
from .measure import Progress


class Windows:
    """Fixed-length windows of a token stream: random ones for training, fixed ones for eval."""

    def __init__(self, ids: Tensor, seq_len: int, name: str):
        if ids.numel() < seq_len + 2:
            raise BenchError(
                f"the {name} split has only {ids.numel()} tokens; it needs at least {seq_len + 2}"
            )
        self.ids = ids
        self.span = seq_len + 1

    def sample(self, batch: int, gen: torch.Generator) -> Tensor:
        starts = torch.randint(0, self.ids.numel() - self.span + 1, (batch,), generator=gen)
        return torch.stack([self.ids[s : s + self.span] for s in starts.tolist()])

    def fixed(self, n: int) -> Tensor:
        """``n`` windows spread evenly over the split (non-overlapping when it is long enough)."""
        last = self.ids.numel() - self.span
        n = max(1, min(n, last + 1))
        starts = [round(i * last / max(1, n - 1)) for i in range(n)] if n > 1 else [0]
        return torch.stack([self.ids[s : s + self.span] for s in starts])


@torch.no_grad()
def eval_nats(model: nn.Module, windows: Tensor, batch: int, device: torch.device) -> float:
    """Mean next-token cross-entropy (nats per token) over ``windows``, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i : i + batch].to(device)
        loss = next_token_loss(model(ids[:, :-1]), ids)
        n = ids[:, 1:].numel()
        total += loss.item() * n
        count += n
    model.train(was_training)
    return total / count


def lr_lambda(steps: int, warmup_frac: float) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_frac`` of the steps, then cosine down to 10 %."""
    warm = max(1, int(round(steps * warmup_frac)))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    stream: Windows,
    steps: int,
    batch: int,
    data_seed: int,
    warmup: float,
    device: torch.device,
    progress: Progress,
    adapters: bool,
) -> list[float]:
    """Train ``steps`` steps on batches drawn by a generator seeded with ``data_seed``; returns
    the loss per step (nats). ``adapters``: run lorazoo's per-step work (``extra_loss`` and the
    optimizer hooks of ``attach``) — this is the only place the bench calls it."""
    from .. import attach

    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, warmup))
    gen = torch.Generator().manual_seed(data_seed)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    curve: list[float] = []
    hooks = attach(model, optimizer, total_steps=steps) if adapters else None
    try:
        _loop(model, optimizer, sched, stream, steps, batch, gen, device, progress, adapters, params, curve)
    finally:
        if hooks is not None:
            hooks.remove()
    model.eval()
    return curve


def _loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    stream: Windows,
    steps: int,
    batch: int,
    gen: torch.Generator,
    device: torch.device,
    progress: Progress,
    adapters: bool,
    params: list[Tensor],
    curve: list[float],
) -> None:
    from .. import extra_loss

    model.train()
    for step in range(steps):
        ids = stream.sample(batch, gen).to(device)
        loss = next_token_loss(model(ids[:, :-1]), ids)
        total = loss
        if adapters:
            extra = extra_loss(model)
            if extra is not None:
                total = total + extra
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sched.step()
        value = loss.item()
        if not math.isfinite(value):
            raise BenchError(f"training diverged at step {step} (loss {value}); try a smaller --lr")
        curve.append(value)
        progress.update(1, f"loss {value:.3f}")
