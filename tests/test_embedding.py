"""Adapters on ``nn.Embedding`` layers (LoRA, rsLoRA, LoRA+).

An embedding is the linear map from one-hot rows (``d_in = num_embeddings``, ``d_out =
embedding_dim``) whose weight is stored transposed. The adapter is ``s·B·A`` in that map's
layout (PEFT's ``lora_embedding_A`` ``r × num_embeddings``, ``lora_embedding_B``
``embedding_dim × r``), so the unmerged output is ``W[ids] + s·Aᵀ[ids]·Bᵀ`` and a merge adds
``(s·B·A)ᵀ`` to the table. Tolerances are the §11 model applied to that one-hot linear map.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorazoo
from lorazoo.engine.inject import hosts
from lorazoo.errors import AdapterFileError, ConfigError, TargetError
from lorazoo.testing import merge_tolerance, perturb

VOCAB, DIM = 50, 12


class Tiny(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32, padding_idx: int | None = 0, vocab: int = VOCAB):
        super().__init__()
        self.embed = nn.Embedding(vocab, DIM, padding_idx=padding_idx, dtype=dtype)
        self.proj = nn.Linear(DIM, 7, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids))


def tiny(dtype: torch.dtype = torch.float32, seed: int = 0, **kw) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(dtype, **kw)


def ids(seed: int = 1, shape: tuple[int, ...] = (3, 9)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def embedding_tolerance(host, tokens: torch.Tensor) -> torch.Tensor:
    """τ of merged vs unmerged for an embedding host: the one-hot linear map's bound."""
    onehot = F.one_hot(tokens, host.num_embeddings).to(host.weight.dtype)
    lrs = [host.adapters[n].lowrank() for n in host.active]
    return merge_tolerance(onehot, host.weight.t(), None, lrs)


@pytest.mark.parametrize("variant", ["lora", "rslora", "loraplus"])
def test_inject_wraps_the_embedding_and_keeps_base_keys(variant):
    m = tiny()
    keys = {k: v.clone() for k, v in m.state_dict().items()}
    base_out = m(ids())
    lorazoo.inject(m, variant, targets=nn.Embedding, r=4)
    host = m.embed
    assert isinstance(host, lorazoo.AdaptedEmbedding)
    assert (host.num_embeddings, host.embedding_dim, host.padding_idx) == (VOCAB, DIM, 0)
    a = host.adapters["default"]
    assert a.lora_A.shape == (4, VOCAB) and a.lora_B.shape == (DIM, 4)
    state = m.state_dict()
    for k, v in keys.items():
        assert torch.equal(state[k], v)
    assert set(state) - set(keys) == {"embed.adapters.default.lora_A", "embed.adapters.default.lora_B"}
    assert torch.equal(_bits(m(ids())), _bits(base_out)), "B = 0 must give the base output bit for bit"
    assert lorazoo.trainable(m).trainable == 4 * (VOCAB + DIM)


def test_unmerged_output_is_the_lookup_formula():
    m = tiny(torch.float64)
    lorazoo.inject(m, "lora", targets="embed", r=3, alpha=6)
    perturb(m, 0)
    host = m.embed
    a = host.adapters["default"]
    t = ids()
    want = host.weight[t] + 2.0 * (a.lora_A.t()[t] @ a.lora_B.t())
    assert torch.allclose(host(t), want, rtol=1e-13, atol=1e-13)
    assert (host(t) - host.weight[t]).abs().max() > 1e-3, "the adapter had no effect"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_matches_unmerged_and_unmerge_is_exact(dtype):
    m = tiny(dtype)
    original = m.embed.weight.detach().clone()
    lorazoo.inject(m, "lora", targets=nn.Embedding, r=4, alpha=8)
    lorazoo.inject(m, "rslora", targets=nn.Embedding, r=2, name="second")
    perturb(m, 3)
    m.eval()
    host = m.embed
    t = ids(shape=(4, 16))
    with torch.no_grad():
        unmerged = host(t)
        lorazoo.merge(m)
        merged = host(t)
    tau = embedding_tolerance(host, t)
    assert ((merged.double() - unmerged.double()).abs() <= tau).all()
    assert not torch.equal(host.weight, original), "merge did not change the table"
    lorazoo.unmerge(m)
    assert torch.equal(_bits(host.weight), _bits(original))
    lorazoo.merge(m)
    lorazoo.eject(m)
    assert isinstance(m.embed, nn.Embedding) and not isinstance(m.embed, lorazoo.AdaptedEmbedding)
    assert torch.equal(_bits(m.embed.weight), _bits(original))


def test_padding_row_gets_no_gradient_and_training_moves_the_rest():
    m = tiny()
    lorazoo.inject(m, "lora", targets=nn.Embedding, r=4)
    perturb(m, 0)
    m.train()
    t = ids()
    t[0, :3] = 0  # the padding index
    m(t).square().mean().backward()
    a = m.embed.adapters["default"]
    assert torch.equal(a.lora_A.grad[:, 0], torch.zeros(4))
    used = torch.unique(t[t != 0])
    assert (a.lora_A.grad[:, used].abs().sum(0) > 0).all()
    assert a.lora_B.grad.abs().sum() > 0
    assert m.embed.weight.grad is None, "the base table must stay frozen"


def test_training_while_merged_is_refused():
    m = tiny()
    lorazoo.inject(m, "lora", targets=nn.Embedding, r=4)
    lorazoo.merge(m)
    m.train()
    with pytest.raises(lorazoo.MergeError, match="unmerge"):
        m(ids())


def test_loraplus_puts_embedding_adapters_in_the_embedding_group():
    """docs/spec/variants.md §4 invariant 3: embedding-adapter tensors sit only in the embedding group, at
    ``lr_embedding``; the linear layer's A and B keep ``lr`` and ``λ·lr``."""
    m = tiny()
    lorazoo.inject(m, "loraplus", targets=[nn.Embedding, nn.Linear], r=4, lr_embedding=3e-6)
    groups = lorazoo.param_groups(m, lr=1e-3)
    emb = {id(p) for p in m.embed.adapters["default"].parameters()}
    lin = m.proj.adapters["default"]
    by_lr = {}
    for g in groups:
        by_lr.setdefault(g["lr"], set()).update(id(p) for p in g["params"])
    assert by_lr[3e-6] == emb
    assert by_lr[1e-3] == {id(lin.lora_A)}
    assert by_lr[16e-3] == {id(lin.lora_B)}
    everything = [id(p) for g in groups for p in g["params"]]
    assert sorted(everything) == sorted(id(p) for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("variant", ["dora", "vera", "olora"])
def test_variants_without_embedding_support_are_refused_with_nothing_changed(variant):
    m = tiny()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ConfigError, match="embedding"):
        lorazoo.inject(m, variant, targets=["embed", "proj"], r=2)
    assert type(m.embed) is nn.Embedding and type(m.proj) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_linear_targets_never_pick_embeddings():
    m = tiny()
    lorazoo.inject(m, "lora", targets=nn.Embedding, r=2, name="e")
    lorazoo.inject(m, "lora", targets="all-linear", r=2, name="all")
    assert "all" not in m.embed.adapters
    lorazoo.inject(m, "lora", targets=nn.Linear, r=2, name="cls")
    assert "cls" not in m.embed.adapters and "cls" in m.proj.adapters
    lorazoo.inject(m, "lora", targets=nn.Embedding, r=2, name="again")  # the wrapped table still matches
    assert set(m.embed.adapters) == {"e", "again"}
    assert [p for p, _ in hosts(m)] == ["embed", "proj"]


def test_max_norm_embedding_is_not_supported():
    m = tiny()
    m.embed.max_norm = 1.0
    with pytest.raises(TargetError, match="max_norm"):
        lorazoo.inject(m, "lora", targets=nn.Embedding, r=2)
    assert type(m.embed) is nn.Embedding


def test_file_round_trip_and_shape_checks(tmp_path: Path):
    m = tiny()
    lorazoo.inject(m, "loraplus", targets=["embed", "proj"], r=4)
    perturb(m, 5)
    path = lorazoo.save(m, tmp_path / "emb.safetensors")
    fresh = tiny()
    lorazoo.load(fresh, path)
    assert isinstance(fresh.embed, lorazoo.AdaptedEmbedding)
    t = ids()
    with torch.no_grad():
        assert torch.equal(fresh(t), m(t))
    other = tiny(vocab=VOCAB + 1)
    with pytest.raises(AdapterFileError, match="embedding layer 'embed'"):
        lorazoo.load(other, path)
    assert type(other.embed) is nn.Embedding and type(other.proj) is nn.Linear

    class Swapped(nn.Module):  # 'embed' is a linear layer with the same (out, in) dimensions
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(VOCAB, DIM)
            self.proj = nn.Linear(DIM, 7)

    with pytest.raises(AdapterFileError, match="Linear"):
        lorazoo.load(Swapped(), path)


def test_matches_peft_embedding_lora():
    peft = pytest.importorskip("peft")
    m = tiny()
    ref = copy.deepcopy(m)
    lorazoo.inject(m, "lora", targets="embed", r=4, alpha=8)
    perturb(m, 2)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed"], lora_dropout=0.0)
    ref = peft.inject_adapter_in_model(cfg, ref)
    a = m.embed.adapters["default"]
    with torch.no_grad():
        ref.embed.lora_embedding_A["default"].copy_(a.lora_A)
        ref.embed.lora_embedding_B["default"].copy_(a.lora_B)
    t = ids()
    with torch.no_grad():
        assert torch.allclose(m(t), ref(t), rtol=1e-6, atol=1e-6)
