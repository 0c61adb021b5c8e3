"""Hugging Face round trips on tiny models built from configs (no downloads).

Per model: inject, train 20 steps with a real optimizer, save in both formats and reload into a
fresh model with identical outputs; merge / unmerge / eject bit for bit; greedy ``generate`` gives
the same tokens unmerged, merged, and after merge_and_unload → save_pretrained → from_pretrained;
``save_pretrained`` with :func:`lorazoo.base_state_dict` writes the base only. Also the
``lorazoo merge`` command end to end.

A model is one entry of ``MODELS`` (add a builder there and the whole suite runs on it; the
``generate`` check runs on the entries marked as causal language models).
"""

from __future__ import annotations

import builtins
import copy

import pytest
import torch
from torch import nn

import lorazoo
from lorazoo.cli import main
from lorazoo.engine.inject import hosts

transformers = pytest.importorskip("transformers")

SEQ = 10


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg)


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=64,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    return transformers.GPT2LMHeadModel(cfg)


# name: (builder, lorazoo targets, modules saved whole, is a causal LM)
MODELS = {
    "llama": (_llama, "all-linear", ["lm_head"], True),
    "bert": (_bert, ["query", "value", "dense"], ["classifier"], False),
    "gpt2": (_gpt2, "all-linear", ["lm_head"], True),
}


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[kind][0]().eval()


def batch(kind: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (3, SEQ), generator=g)
    if MODELS[kind][3]:
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "labels": torch.randint(0, 3, (3,), generator=g)}


def logits(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch(kind, 99)["input_ids"]).logits


def trained(kind: str) -> nn.Module:
    """The model with a LoRA adapter and a module saved whole, trained 20 AdamW steps."""
    model = build(kind)
    _, targets, saved, _ = MODELS[kind]
    lorazoo.inject(model, "lora", targets=targets, r=4, alpha=8)
    lorazoo.modules_to_save(model, saved)
    model.train()
    opt = torch.optim.AdamW(lorazoo.param_groups(model, lr=1e-2))
    for step in range(20):
        loss = model(**batch(kind, step)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def bits(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous().view(torch.uint8) for k, v in model.state_dict().items()}


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def greedy(model: nn.Module) -> torch.Tensor:
    prompt = batch("llama", 7)["input_ids"][:2, :5]
    with torch.no_grad():
        return model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=12,
            min_new_tokens=12,  # no early stop at an end-of-sequence token
            do_sample=False,
            pad_token_id=0,
        )[:, 5:]


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    return request.param, trained(request.param)


@pytest.fixture(scope="module", params=[kind for kind, entry in MODELS.items() if entry[3]])
def lm_case(request):
    """Like ``case``, for the causal language models only (``generate``)."""
    return request.param, trained(request.param)


def test_training_moved_adapters_and_copies_not_the_base(case):
    kind, model = case
    base = build(kind)
    base_sd = base.state_dict()
    own = lorazoo.base_state_dict(model)
    assert own.keys() == base_sd.keys()
    for k, v in base_sd.items():
        assert torch.equal(own[k], v), f"{k}: the frozen base changed in training"
    saved = MODELS[kind][2][0]
    copy_w = dict(model.named_parameters())[f"{saved}.modules_to_save.default.weight"]
    assert not torch.equal(copy_w, base_sd[f"{saved}.weight"])
    assert (logits(model, kind) - logits(base, kind)).abs().max() > 1e-3


@pytest.mark.parametrize("fmt", ["lorazoo", "peft"])
def test_save_and_reload_into_a_fresh_model(case, fmt, tmp_path):
    kind, model = case
    path = tmp_path / ("a.safetensors" if fmt == "lorazoo" else "folder")
    lorazoo.save(model, path, format=fmt)
    fresh = build(kind)
    lorazoo.load(fresh, path)
    assert torch.equal(logits(fresh, kind), logits(model, kind))
    assert lorazoo.trained_modules(fresh) == lorazoo.trained_modules(model)


def test_merge_unmerge_eject_bit_exact(case):
    kind, trained_model = case
    model = copy.deepcopy(trained_model)
    before = bits(model)
    y = logits(model, kind)
    lorazoo.merge(model)
    torch.testing.assert_close(logits(model, kind), y, rtol=1e-4, atol=1e-5)
    saved = MODELS[kind][2][0]
    # the trained copy is not a low-rank update: the merge leaves it alone
    assert torch.equal(
        dict(model.named_parameters())[f"{saved}.modules_to_save.default.weight"],
        dict(trained_model.named_parameters())[f"{saved}.modules_to_save.default.weight"],
    )
    lorazoo.unmerge(model)
    same_bits(bits(model), before)
    assert torch.equal(logits(model, kind), y)
    lorazoo.eject(model)
    same_bits(bits(model), bits(build(kind)))
    assert type(model.get_submodule(saved)) is type(build(kind).get_submodule(saved))
    assert not hosts(model)


def test_base_state_dict_saves_the_base_only(case, tmp_path):
    kind, model = case
    model.save_pretrained(tmp_path / "base", state_dict=lorazoo.base_state_dict(model))
    cls = type(model)
    again, info = cls.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    same_bits(bits(again), bits(build(kind)))


def test_plain_save_pretrained_writes_the_base_only(case, tmp_path):
    kind, trained_model = case
    model = copy.deepcopy(trained_model)
    model.save_pretrained(tmp_path / "plain")
    again, info = type(model).from_pretrained(tmp_path / "plain", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    same_bits(bits(again), bits(build(kind)))
    # with every adapter ejected (or unloaded), the model's own list is as it was
    own = set(build(kind)._keys_to_ignore_on_save)
    lorazoo.eject(model)
    assert set(model._keys_to_ignore_on_save) == own
    again = copy.deepcopy(trained_model)
    lorazoo.merge_and_unload(again)
    assert set(again._keys_to_ignore_on_save) == own


def test_base_state_dict_refuses_a_merged_model(case):
    kind, trained_model = case
    model = copy.deepcopy(trained_model)
    lorazoo.merge(model)
    with pytest.raises(lorazoo.MergeError, match="unmerge"):
        lorazoo.base_state_dict(model)


def test_merge_and_unload_gives_a_plain_model(case, tmp_path):
    kind, trained_model = case
    model = copy.deepcopy(trained_model)
    y = logits(model, kind)
    classes = {n: type(m) for n, m in build(kind).named_modules()}
    lorazoo.merge_and_unload(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert model.state_dict().keys() == build(kind).state_dict().keys()
    torch.testing.assert_close(logits(model, kind), y, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path / "merged")
    again, info = type(model).from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    assert torch.equal(logits(again.eval(), kind), logits(model, kind))


def test_generate_same_tokens_unmerged_merged_and_reloaded(lm_case, tmp_path):
    kind, trained_model = lm_case
    model = copy.deepcopy(trained_model)
    unmerged = greedy(model)
    lorazoo.merge(model)
    merged = greedy(model)
    lorazoo.unmerge(model)
    lorazoo.merge_and_unload(model)
    model.save_pretrained(tmp_path / "merged")
    reloaded = greedy(type(model).from_pretrained(tmp_path / "merged").eval())
    assert unmerged.shape == (2, 12)
    assert torch.equal(unmerged, merged)
    assert torch.equal(unmerged, reloaded)
    # the adapter changes what is generated (the comparison is not between base models)
    assert not torch.equal(unmerged, greedy(build(kind)))


# --------------------------------------------------------------------------------------------
# lorazoo merge
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = trained("llama")
    model.save_pretrained(root / "base", state_dict=lorazoo.base_state_dict(model))
    (root / "base" / "tokenizer_config.json").write_text("{}\n")
    lorazoo.save(model, root / "adapter.safetensors")
    lorazoo.save(model, root / "peft", format="peft")
    return root, model


@pytest.mark.parametrize("adapter", ["adapter.safetensors", "peft"])
def test_cli_merge_writes_a_merged_folder(llama_folders, adapter, tmp_path, capsys):
    root, model = llama_folders
    out = tmp_path / "merged"
    rc = main(["merge", "--model", str(root / "base"), "--adapter", str(root / adapter), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert (out / "tokenizer_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    merged, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert not any(isinstance(m, lorazoo.AdaptedLinear) for m in merged.modules())
    reference = copy.deepcopy(model)
    lorazoo.merge_and_unload(reference)
    assert torch.equal(logits(merged.eval(), "llama"), logits(reference, "llama"))


def test_cli_merge_refuses_a_non_empty_out(llama_folders, tmp_path, capsys):
    root, _ = llama_folders
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["merge", "--model", str(root / "base"), "--adapter", str(root / "peft"), "--out", str(out)]
    assert main(args) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_merge_without_transformers_says_so(llama_folders, tmp_path, monkeypatch, capsys):
    root, _ = llama_folders
    real = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    out = tmp_path / "merged"
    args = ["merge", "--model", str(root / "base"), "--adapter", str(root / "peft"), "--out", str(out)]
    assert main(args) == 1
    assert "needs the transformers package" in capsys.readouterr().err
    assert not out.exists()


def test_cli_merge_of_a_broken_model_folder_says_why(llama_folders, tmp_path, capsys):
    root, _ = llama_folders
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((root / "base" / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "merged"
    args = ["merge", "--model", str(broken), "--adapter", str(root / "peft"), "--out", str(out)]
    assert main(args) == 1
    assert "could not load the model" in capsys.readouterr().err
    assert not out.exists()
