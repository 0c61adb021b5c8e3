"""Bytes held per element while merged (for the bit-exact unmerge), by update size and dtype.

LoRA r=16 on every linear layer of the small Llama (512/1376/8 layers). The adapter's ``B`` is
drawn so that ``|ΔW|`` is about 1 %, 10 % or 100 % of ``|W|``. The figure counts everything held:
the int8 record (dense or sparse) plus the full bit patterns of "wide" elements, whose value the
merge cannot carry. After each merge and unmerge the weights are checked bit for bit.

    python benchmarks/bench_unmerge_bytes.py
"""

from __future__ import annotations

import argparse

import torch
from _common import markdown_table, record

import lorazoo
from lorazoo.bench.model import LLAMA_SMALL, LlamaConfig, LlamaLike


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two layers instead of eight")
    args = ap.parse_args()
    cfg = LLAMA_SMALL if not args.quick else LlamaConfig(**{**LLAMA_SMALL.to_dict(), "num_layers": 2})
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        model = LlamaLike(cfg, dtype=dtype)
        lorazoo.inject(model, "lora", targets="all-linear", r=16, alpha=32)
        base = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
        for rel in (0.01, 0.1, 1.0):
            with torch.no_grad():
                for _, _, a in lorazoo.engine.iter_adapters(model):
                    row_norm = a.lora_A.float().pow(2).sum(1).mean().sqrt()
                    a.lora_B.normal_(std=rel * 0.02 / (a.scale * row_norm * 16**0.5))
            lorazoo.merge(model)
            rep = lorazoo.merge_report(model)
            lorazoo.unmerge(model)
            exact = all(torch.equal(model.state_dict()[k], v) for k, v in base.items())
            rows.append(
                [
                    str(dtype).replace("torch.", ""),
                    f"{rel:g}",
                    f"{rep.bytes_per_element:.3f}",
                    f"{rep.wide_elements / rep.elements:.1e}",
                    "yes" if exact else "NO",
                ]
            )
    table = markdown_table(["dtype", "|ΔW|/|W|", "bytes held / element", "wide share", "bit-exact"], rows)
    record("Bytes held for exact unmerge (LoRA r=16, small Llama, all-linear)", table)


if __name__ == "__main__":
    main()
