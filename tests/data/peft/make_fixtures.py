"""Regenerate the PEFT fixture folders beside this file (needs peft; CPU; a few seconds):

    python tests/data/peft/make_fixtures.py [CASE ...]    # every case, or only those named

Each ``<case>/`` holds what PEFT's ``save_pretrained`` wrote (``adapter_config.json``,
``adapter_model.safetensors``), the base model's weights (``base.safetensors``) and
``expected.safetensors``: an input and PEFT's output for the whole model (``input``,
``output``) and, per adapted layer ``<p>``, an input and PEFT's output for that layer alone
(``layer.<p>.input``, ``layer.<p>.output``). The adapters are trained a few steps first, so
no factor is at its initial value. The model builders are importable without peft.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

HERE = Path(__file__).resolve().parent
VOCAB = 20


def mlp() -> nn.Sequential:
    """A plain MLP: 8 → 12 → 12 → 4."""
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 4))


class EmbedNet(nn.Module):
    """An embedding table followed by a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


class GPT2Logits(nn.Module):
    """A one-layer GPT-2 (hidden size 8, untied head) returning logits: its projections are
    transformers' ``Conv1D`` (weights stored in × out). Needs transformers."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=VOCAB,
            n_positions=8,
            n_embd=8,
            n_layer=1,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.lm = GPT2LMHeadModel(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits


# Cases whose model is built with transformers (their tests skip without it).
NEEDS_TRANSFORMERS = ("lora_conv1d",)


def cnn() -> nn.Sequential:
    """A plain CNN of Conv2d layers: 3 → 6 (3×3, padding 1) → 4 (3×3, stride 2) → 2 (1×1)."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2), nn.Tanh(), nn.Conv2d(4, 2, 1)
    )


def cnn1d() -> nn.Sequential:
    """A plain 1-D CNN of Conv1d layers: 3 → 5 (kernel 3, stride 2) → 4 (kernel 2, padding 1)."""
    return nn.Sequential(nn.Conv1d(3, 5, 3, stride=2), nn.ReLU(), nn.Conv1d(5, 4, 2, padding=1))


def model_input(case: str, g: torch.Generator) -> torch.Tensor:
    if BUILDERS[case] in (EmbedNet, GPT2Logits):
        return torch.randint(0, VOCAB, (3, 7), generator=g)
    if BUILDERS[case] is cnn:
        return torch.randn(2, 3, 7, 7, generator=g)
    if BUILDERS[case] is cnn1d:
        return torch.randn(2, 3, 9, generator=g)
    return torch.randn(5, 8, generator=g)


def layer_input(module: nn.Module, g: torch.Generator) -> torch.Tensor:
    if isinstance(module, nn.Embedding):
        return torch.randint(0, module.num_embeddings, (11,), generator=g)
    if isinstance(module, nn.Conv2d):
        return torch.randn(2, module.in_channels, 6, 5, generator=g)
    if isinstance(module, nn.Conv1d):
        return torch.randn(2, module.in_channels, 8, generator=g)
    d_in = module.in_features if hasattr(module, "in_features") else module.weight.shape[0]  # Conv1D
    return torch.randn(6, d_in, generator=g)


BUILDERS = {
    "lora": mlp,
    "rslora": mlp,
    "dora": mlp,
    "vera": mlp,
    "vera_regenerated": mlp,
    "lora_alpha_pattern": mlp,
    "lora_embedding": EmbedNet,
    "lora_modules_to_save": mlp,
    "lora_conv1d": GPT2Logits,
    "adalora": mlp,
    "adalora_unmasked": mlp,
    "lora_conv": cnn,
    "dora_conv1d": cnn1d,
}

# AdaLoRA cases trained through PEFT's final mask (rank_pattern written, tensors cut).
FINAL_MASK = ("adalora",)


def configs():  # pragma: no cover - needs peft
    import peft

    linear = ["0", "2", "4"]
    return {
        "lora": peft.LoraConfig(r=2, lora_alpha=4, target_modules=linear),
        "rslora": peft.LoraConfig(r=4, lora_alpha=3, target_modules=linear, use_rslora=True),
        "dora": peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], use_dora=True),
        "vera": peft.VeraConfig(r=6, target_modules=linear, projection_prng_key=3),
        "vera_regenerated": peft.VeraConfig(
            r=6, target_modules=linear, projection_prng_key=4, save_projection=False
        ),
        # Patterns that give every adapted module the same values are read.
        "lora_alpha_pattern": peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["0", "2"], alpha_pattern={"0": 6, "2": 6}
        ),
        "lora_embedding": peft.LoraConfig(r=3, lora_alpha=6, target_modules=["embed", "head"]),
        # The output layer trained whole beside the adapter (stored under its own path "4").
        "lora_modules_to_save": peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["0", "2"], modules_to_save=["4"]
        ),
        # transformers' Conv1D layers: PEFT writes fan_in_fan_out=true, factors in linear layout.
        "lora_conv1d": peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
        ),
        # Four steps, the last one PEFT's final mask: ranks cut per layer, rank_pattern written.
        "adalora": peft.AdaLoraConfig(
            init_r=4, target_r=2, lora_alpha=6, target_modules=linear, total_step=3, orth_reg_weight=0.1
        ),
        # Trained without masking: full init_r tensors, no rank_pattern.
        "adalora_unmasked": peft.AdaLoraConfig(
            init_r=3, target_r=2, lora_alpha=5, target_modules=linear, total_step=10
        ),
        "lora_conv": peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2", "4"]),
        "dora_conv1d": peft.LoraConfig(r=2, lora_alpha=3, target_modules=["0", "2"], use_dora=True),
    }


def make(case: str, config) -> None:  # pragma: no cover - needs peft
    import peft

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    base = BUILDERS[case]()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    pm = peft.get_peft_model(base, config)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    for step in range(4):
        x = model_input(case, g)
        loss = pm(x).pow(2).mean() - pm(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if case in FINAL_MASK:
            pm.base_model.update_and_allocate(step)  # PEFT's AdaLoRA loop; step 3 is the final mask
    pm.eval()
    out = HERE / case
    if out.exists():
        shutil.rmtree(out)
    pm.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model card template, not needed here
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.pop("auto_mapping", None)  # names this script's module; PEFT does not need it
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file(base_state, out / "base.safetensors")
    expected = {}
    with torch.no_grad():
        x = model_input(case, g)
        expected["input"], expected["output"] = x, pm(x)
        inner = pm.base_model.model
        for name, module in inner.named_modules():
            if hasattr(module, "base_layer") and name:
                xi = layer_input(module.base_layer, g)
                expected[f"layer.{name}.input"], expected[f"layer.{name}.output"] = xi, module(xi)
    save_file({k: v.contiguous() for k, v in expected.items()}, out / "expected.safetensors")


def main() -> int:  # pragma: no cover - needs peft
    wanted = sys.argv[1:]
    for case, config in configs().items():
        if wanted and case not in wanted:
            continue
        make(case, config)
        size = sum(f.stat().st_size for f in (HERE / case).iterdir())
        print(f"{case}: {size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
