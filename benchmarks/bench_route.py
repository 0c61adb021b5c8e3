"""Mixed batches: one forward whose rows use different adapters (``lorazoo.route``).

Four LoRA adapters (r = 16, every linear layer) on the small Llama (512/1376/8 layers; 2 layers
with ``--quick``), a batch of 8 rows × 128 tokens, rows assigned round-robin to the four
adapters. Inference (``torch.no_grad``), fp32. Cases, interleaved:

* ``uniform``: the whole batch through one adapter (the fused single-adapter forward): what a
  batch costs when every row wants the same task, the figure routing is measured against;
* ``routed``: ``lorazoo.route`` on the mixed batch;
* ``routed, sorted``: the same rows sorted by adapter, so each adapter's rows are one run
  (routed through slices, without gathers);
* ``sub-batches``: the alternative without routing, one forward per adapter on its own rows;
* ``PEFT routed``: PEFT's mixed-batch forward (``adapter_names``) on the same adapters, when PEFT
  is installed;
* ``base``: the base model alone, the floor.

Every routed row is checked against the row of its sub-batch run before timing.

    python benchmarks/bench_route.py [--quick] [--threads 1] [--repeats N]
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import (
    LLAMA_TARGETS,
    NOT_INSTALLED,
    fmt,
    markdown_table,
    paired,
    peft_lora_config,
    peft_module,
    ratio,
    record,
    set_threads,
    stats,
)

import lorazoo
from lorazoo.bench.model import LLAMA_SMALL, LlamaConfig, LlamaLike

R, ALPHA, ADAPTERS, ROWS, TOKENS = 16, 32, 4, 8, 128


def names_per_row() -> list[str]:
    return [f"task{i % ADAPTERS}" for i in range(ROWS)]


def build(cfg: LlamaConfig):
    torch.manual_seed(0)
    base = LlamaLike(cfg).eval()
    ours = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    for i in range(ADAPTERS):
        lorazoo.inject(ours, "lora", targets="all-linear", r=R, alpha=ALPHA, name=f"task{i}")
    with torch.no_grad():
        for _, _, a in lorazoo.engine.iter_adapters(ours):
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.01)
    return base, ours.eval()


def peft_twin(base, ours):
    """PEFT's model with the same four adapters, and a context that routes its rows."""
    peft = peft_module()
    if peft is None:
        return None
    model = copy.deepcopy(base)
    for i in range(ADAPTERS):
        peft.inject_adapter_in_model(
            peft_lora_config(R, ALPHA, LLAMA_TARGETS), model, adapter_name=f"task{i}"
        )
    layers = []
    with torch.no_grad():
        for path, name, a in lorazoo.engine.iter_adapters(ours):
            layer = model.get_submodule(path)
            layer.lora_A[name].weight.copy_(a.lora_A)
            layer.lora_B[name].weight.copy_(a.lora_B)
            if layer not in layers:
                layers.append(layer)
    rows = names_per_row()

    def forward(ids):
        # PEFT's own mixed-batch mechanism: each LoRA layer's forward takes ``adapter_names``
        # (PeftModel passes it through pre-forward hooks, as these do).
        hooks = [
            layer.register_forward_pre_hook(
                lambda m, a, kw: (a, {**kw, "adapter_names": rows}), with_kwargs=True
            )
            for layer in layers
        ]
        try:
            return model(ids)
        finally:
            for h in hooks:
                h.remove()

    return model.eval(), forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, 5 rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    set_threads(args.threads)
    cfg = LLAMA_SMALL if not args.quick else LlamaConfig(**{**LLAMA_SMALL.to_dict(), "num_layers": 2})
    repeats = args.repeats or (5 if args.quick else 15)
    base, ours = build(cfg)
    ids = torch.randint(0, cfg.vocab_size, (ROWS, TOKENS), generator=torch.Generator().manual_seed(2))
    rows = names_per_row()
    groups = {n: [i for i, m in enumerate(rows) if m == n] for n in dict.fromkeys(rows)}

    def uniform():
        lorazoo.set_active(ours, ["task0"])
        return ours(ids)

    def routed():
        with lorazoo.route(ours, rows):
            return ours(ids)

    by_adapter = sorted(range(ROWS), key=lambda i: rows[i])
    sorted_ids, sorted_rows = ids[by_adapter], [rows[i] for i in by_adapter]

    def routed_sorted():
        with lorazoo.route(ours, sorted_rows):
            return ours(sorted_ids)

    def sub_batches():
        out = None
        for name, idx in groups.items():
            lorazoo.set_active(ours, [name])
            part = ours(ids[idx])
            out = part.new_empty((ROWS, *part.shape[1:])) if out is None else out
            out[idx] = part
        return out

    twin = peft_twin(base, ours)
    with torch.no_grad():
        got, ref = routed(), sub_batches()
        scale = float(ref.abs().max())
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * scale), "routed rows differ from sub-batches"
        got = routed_sorted()
        assert torch.allclose(got, ref[by_adapter], rtol=1e-4, atol=1e-5 * scale), "sorted rows differ"
        if twin is not None:
            assert torch.allclose(twin[1](ids), ref, rtol=1e-4, atol=1e-5 * scale), "PEFT rows differ"

    cases = {
        "base": lambda: base(ids),
        "uniform": uniform,
        "routed": routed,
        "routed, sorted": routed_sorted,
        "sub-batches": sub_batches,
    }
    if twin is not None:
        cases["PEFT routed"] = lambda: twin[1](ids)
    with torch.no_grad():
        samples = paired(cases, repeats=repeats, warmup=2)
    table = []
    for name in cases:
        s = stats(samples[name]["cpu"])
        table.append(
            [
                name,
                fmt(s, unit=" s"),
                fmt(ratio(samples, name, "base", "cpu")),
                fmt(ratio(samples, name, "uniform", "cpu")),
                fmt(ratio(samples, name, "routed", "cpu")),
            ]
        )
    if twin is None:
        table.append(["PEFT routed", NOT_INSTALLED, "", "", ""])
    record(
        f"Mixed batch: {ROWS} rows × {TOKENS} tokens over {ADAPTERS} LoRA adapters (r={R}, all-linear), "
        f"small Llama {cfg.num_layers}L, fp32, {args.threads} thread(s)",
        markdown_table(["case", "CPU time", "÷ base", "÷ uniform", "÷ routed"], table),
        "Medians [interquartile range] of per-round ratios (process CPU time), cases interleaved. "
        "'uniform': every row through one adapter (the fused forward); 'sub-batches': one forward "
        "per adapter on its own rows.",
    )


if __name__ == "__main__":
    main()
