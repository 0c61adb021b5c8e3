"""Trainable parameters and adapter-file bytes of VeRA against LoRA at the same targets.

Two models: a stack of eight 512×512 linear layers, and the small Llama
(``lorazoo.bench.model.LLAMA_SMALL``) with every linear layer but the head adapted. LoRA at
r = 16 against VeRA at r = 256 (PEFT's default), VeRA with its projections regenerated from the
seed (lorazoo's default) and stored (``save_projection=True``, PEFT's default). Every file is
loaded back onto an untouched copy of the base and checked bit for bit (tensors and forward).
Sizes are deterministic, so there is no timing and no spread.

    python benchmarks/bench_vera_size.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from _common import markdown_table, record
from torch import nn

import lorazoo
from lorazoo.bench.model import LLAMA_SMALL, LlamaConfig, LlamaLike


class Stack(nn.Module):
    """``n`` square linear layers with tanh between them."""

    def __init__(self, n: int = 8, d: int = 512):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@torch.no_grad()
def _perturb(model: nn.Module) -> None:
    """Move every trainable tensor off its initial value, so the reload check means something."""
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g).to(p) * 0.01)


def measure(
    build: Callable[[], nn.Module], inputs: torch.Tensor, variant: str, targets, tmp: Path, **hyper
) -> dict[str, object]:
    torch.manual_seed(0)
    base = build()
    fresh = copy.deepcopy(base)
    lorazoo.inject(base, variant, targets=targets, **hyper)
    count = lorazoo.trainable(base)
    frozen = 0
    for _, _, a in lorazoo.engine.iter_adapters(base):
        shared = getattr(a, "shared", None)
        if shared is not None:
            frozen = sum(b.numel() for b in shared.buffers())
            break
    _perturb(base)
    path = lorazoo.save(base, tmp / f"{variant}-{len(list(tmp.iterdir()))}.safetensors")
    lorazoo.load(fresh, path)
    base.eval()
    fresh.eval()
    with torch.no_grad():
        same_out = torch.equal(base(inputs), fresh(inputs))
    sd1 = {k: v for k, v in base.state_dict().items() if ".adapters." in k}
    sd2 = fresh.state_dict()
    same_tensors = all(torch.equal(v, sd2[k]) for k, v in sd1.items())
    return {
        "trainable": count.trainable,
        "frozen": frozen,
        "bytes": path.stat().st_size,
        "exact": same_out and same_tensors,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two Llama decoder layers instead of eight")
    args = ap.parse_args()
    llama_cfg = LLAMA_SMALL if not args.quick else LlamaConfig(**{**LLAMA_SMALL.to_dict(), "num_layers": 2})
    models = [
        ("8 × Linear(512, 512)", Stack, torch.randn(4, 512), [nn.Linear]),
        (
            f"Llama small ({llama_cfg.num_layers} layers), all-linear",
            lambda: LlamaLike(llama_cfg),
            torch.randint(0, llama_cfg.vocab_size, (2, 16)),
            "all-linear",
        ),
    ]
    configs = [
        ("lora", "r=16, α=32", {"r": 16, "alpha": 32}),
        ("vera", "r=256, projections from the seed", {"r": 256}),
        ("vera", "r=256, save_projection=True", {"r": 256, "save_projection": True}),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for label, build, x, targets in models:
            lora = None
            for variant, desc, hyper in configs:
                m = measure(build, x, variant, targets, tmp, **hyper)
                if lora is None:
                    lora = m
                rows.append(
                    [
                        label,
                        f"{variant} ({desc})",
                        f"{m['trainable']:,}",
                        f"{lora['trainable'] / m['trainable']:.1f}×",
                        f"{m['frozen']:,}",
                        f"{m['bytes']:,}",
                        f"{lora['bytes'] / m['bytes']:.1f}×",
                        "yes" if m["exact"] else "NO",
                    ]
                )
    header = [
        "model",
        "adapter",
        "trainable params",
        "LoRA / this (params)",
        "frozen shared (once)",
        "file bytes",
        "LoRA / this (bytes)",
        "reload bit-exact",
    ]
    table = markdown_table(header, rows)
    notes = (
        "File bytes include the safetensors header and lorazoo's JSON metadata. VeRA's frozen "
        "projections are buffers: not trainable, not counted by `lorazoo.trainable`, stored only "
        "with `save_projection=True`."
    )
    record("VeRA vs LoRA: trainable parameters and adapter-file bytes", table, notes)


if __name__ == "__main__":
    main()
