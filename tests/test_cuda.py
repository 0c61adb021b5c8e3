"""The conformance suite and an end-to-end round trip on CUDA. These run only where a GPU is
present; CI machines have none, so the CPU suite is the gate and this file is run by hand on a
GPU machine (``python -m pytest tests/test_cuda.py``)."""

import pytest
import torch

import lorazoo
import lorazoo.testing
from lorazoo.bench.model import LlamaConfig, LlamaLike

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("variant", lorazoo.variants())
def test_conformance_on_cuda(variant):
    lorazoo.testing.run_conformance(variant, max_examples=10, device="cuda")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_llama_merge_unmerge_bitexact_on_cuda(tmp_path, dtype):
    torch.manual_seed(0)
    cfg = LlamaConfig(num_layers=2, hidden_size=256, intermediate_size=688, num_heads=4)
    model = LlamaLike(cfg, device="cuda", dtype=dtype).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    lorazoo.inject(model, "lora", targets="all-linear", r=16, alpha=32)
    lorazoo.testing.perturb(model, 0)
    with torch.no_grad():
        unmerged = model(ids).float()
        lorazoo.merge(model)
        merged = model(ids).float()
    rel = float((merged - unmerged).abs().max() / unmerged.abs().max())
    assert rel < 8 * torch.finfo(dtype).eps, rel
    lorazoo.unmerge(model)
    for k, v in base.items():
        assert torch.equal(model.state_dict()[k], v), k
    lorazoo.save(model, tmp_path / "a.safetensors")
    cpu = LlamaLike(cfg, dtype=dtype)
    cpu.load_state_dict({k: v.cpu() for k, v in base.items()})
    lorazoo.load(cpu, tmp_path / "a.safetensors")
    for (_, _, a), (_, _, b) in zip(
        lorazoo.engine.iter_adapters(model), lorazoo.engine.iter_adapters(cpu), strict=True
    ):
        for k, t in a.state_dict().items():
            assert torch.equal(t.cpu(), b.state_dict()[k]), k
