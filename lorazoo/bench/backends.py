"""The model a bench run adapts: the built-in byte-level decoder, or a local Hugging Face model.

A backend turns domain bytes into token ids, builds a fresh copy of the base for each run and
says how many bytes a token stands for (1 for the byte-level model), which turns a loss in nats
per token into bits per byte: ``bpb = nats / ln 2 / bytes_per_token``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LorazooError
from .model import LlamaConfig, LlamaLike


class BenchError(LorazooError, ValueError):
    """A bench option or input that cannot be used; the message says what would work."""


def next_token_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy in nats; ``logits`` are for ``ids[:, :-1]``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


class ByteBackend:
    """The byte-level ``LlamaLike`` of :mod:`lorazoo.bench.model` (vocabulary 256)."""

    kind = "bytes"

    def __init__(self, cfg: LlamaConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.base_state: dict[str, Tensor] | None = None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": self.cfg.to_dict()}

    def encode(self, data: bytes) -> Tensor:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.long)

    def bytes_per_token(self, data: bytes, ids: Tensor) -> float:
        return 1.0

    def new_random(self, seed: int) -> LlamaLike:
        torch.manual_seed(seed)
        return LlamaLike(self.cfg, device=self.device)

    def fresh(self) -> nn.Module:
        """A new model holding the base weights (the caller may change it freely)."""
        if self.base_state is None:
            raise RuntimeError("the base is not built yet")
        model = LlamaLike(self.cfg, device=self.device)
        model.load_state_dict(self.base_state)
        return model


class _CausalLM(nn.Module):
    """``forward(ids) -> logits`` around a transformers causal LM (module names gain ``lm.``)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def get_output_embeddings(self) -> nn.Module | None:
        return self.lm.get_output_embeddings()

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


def check_model_dir(path: str) -> Path:
    """``path`` as a Hugging Face model directory, or a :class:`BenchError` saying why not."""
    p = Path(path).expanduser()
    if not p.exists():
        raise BenchError(f"--model {path!r} does not exist; give a local Hugging Face model directory")
    if not p.is_dir():
        raise BenchError(
            f"--model {path!r} is a file, not a directory; give the folder holding config.json "
            "and the weights"
        )
    if not (p / "config.json").is_file():
        raise BenchError(
            f"--model {path!r} is not a Hugging Face model directory: it has no config.json "
            "(save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir))"
        )
    return p


class HFBackend:
    """A local Hugging Face causal language model and its tokenizer (``transformers`` needed)."""

    kind = "huggingface"

    def __init__(self, path: str, device: torch.device):
        self.path = check_model_dir(path)
        try:
            import transformers
        except ImportError as exc:
            raise BenchError(
                "lorazoo bench --model needs the transformers package, which is not installed: "
                "pip install transformers (or run without --model to use the built-in model)"
            ) from exc
        self.device = device
        self._transformers = transformers
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.path))
            self._base = transformers.AutoModelForCausalLM.from_pretrained(str(self.path))
        except Exception as exc:
            raise BenchError(
                f"--model {path!r}: transformers could not load it: {type(exc).__name__}: {exc}"
            ) from exc
        self._base.to(device)
        self._base.eval()
        self.cfg = None
        self.base_state = None
        max_len = getattr(self._base.config, "max_position_embeddings", None)
        self.max_seq_len = int(max_len) if max_len else None

    def describe(self) -> dict[str, Any]:
        cfg = self._base.config
        return {
            "kind": self.kind,
            "path": str(self.path),
            "model_type": getattr(cfg, "model_type", None),
            "parameters": sum(p.numel() for p in self._base.parameters()),
            "transformers": self._transformers.__version__,
        }

    def encode(self, data: bytes) -> Tensor:
        text = data.decode("utf-8", errors="replace")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def bytes_per_token(self, data: bytes, ids: Tensor) -> float:
        """Average bytes per token over the whole split (a window's own ratio varies around it)."""
        return len(data) / max(1, ids.numel())

    def fresh(self) -> nn.Module:
        return _CausalLM(copy.deepcopy(self._base))


def bits_per_byte(nats_per_token: float, bytes_per_token: float) -> float:
    return nats_per_token / math.log(2) / bytes_per_token
