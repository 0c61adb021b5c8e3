"""A small decoder-only transformer in the Llama layout, built from a config (no downloads).

Module names follow Hugging Face Llama (``model.layers.N.self_attn.q_proj``, ``mlp.up_proj``,
``lm_head``…) so the usual target names work. Used by ``lorazoo bench`` and the benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 256
    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 6
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


# Shapes used across benchmarks.
LLAMA_7B = LlamaConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, max_seq_len=4096
)
LLAMA_MID = LlamaConfig(
    vocab_size=32000, hidden_size=1024, intermediate_size=2752, num_layers=4, num_heads=16, max_seq_len=512
)
LLAMA_SMALL = LlamaConfig(
    vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8, max_seq_len=512
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, **opts):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **opts))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, **opts):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = d // cfg.num_heads
        self.q_proj = nn.Linear(d, d, bias=False, **opts)
        self.k_proj = nn.Linear(d, d, bias=False, **opts)
        self.v_proj = nn.Linear(d, d, bias=False, **opts)
        self.o_proj = nn.Linear(d, d, bias=False, **opts)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, d = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(h.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, **opts):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, **opts)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, **opts)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, **opts)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, **opts):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, **opts)
        self.self_attn = Attention(cfg, **opts)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, **opts)
        self.mlp = MLP(cfg, **opts)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: LlamaConfig, **opts):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, **opts)
        self.layers = nn.ModuleList(Block(cfg, **opts) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, **opts)


class LlamaLike(nn.Module):
    """``forward(ids) -> logits``; ``loss(ids)`` is next-token cross-entropy in nats."""

    def __init__(
        self, cfg: LlamaConfig, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ):
        super().__init__()
        opts = {"device": device, "dtype": dtype}
        self.config = cfg
        self.model = Decoder(cfg, **opts)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, **opts)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        head_dim = cfg.hidden_size // cfg.num_heads
        if str(device) != "meta":
            inv = 1.0 / (
                cfg.rope_theta
                ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
            )
            t = torch.arange(cfg.max_seq_len, dtype=torch.float32, device=device)
            ang = torch.outer(t, inv)
            ang = torch.cat((ang, ang), dim=-1)
            self.register_buffer("rope_cos", ang.cos().to(dtype or torch.float32), persistent=False)
            self.register_buffer("rope_sin", ang.sin().to(dtype or torch.float32), persistent=False)
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = 0.02
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
        # GPT-2 style: shrink residual projections with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(1 / math.sqrt(2 * self.config.num_layers))

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        x = self.model.embed_tokens(ids)
        cos, sin = self.rope_cos[:t].to(x.dtype), self.rope_sin[:t].to(x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))

    def loss(self, ids: Tensor) -> Tensor:
        logits = self.forward(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
