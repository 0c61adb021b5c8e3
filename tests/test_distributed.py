"""Training on several processes: DistributedDataParallel with default arguments and FSDP2
(``fully_shard``), each on two gloo processes on 127.0.0.1; and, on one process, what they rest
on: inactive adapters are frozen while inactive and get their flags back when active again.

The two-process tests run this file as a script (``python test_distributed.py <scenario> ...``)
in two subprocesses that write their results to files; a run that hangs is killed at a timeout
and fails the test instead of blocking the suite.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lorazoo
import lorazoo.testing
from lorazoo.engine import hosts

WORLD = 2
TIMEOUT_S = 300  # per two-process run; a healthy one takes a few seconds
STEPS = 3
DDP_VARIANTS = ("lora", "dora", "vera", "olora", "loraplus", "rslora")
FSDP_VARIANTS = ("lora", "dora")
HYPER: dict[str, dict[str, Any]] = {"vera": {"r": 8}}


# ---- models and data shared by the workers and the checks ------------------------------------


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 4))


def adapt(model: nn.Module, variant: str, name: str = "default") -> nn.Module:
    torch.manual_seed(1)
    hyper = {"r": 2, "alpha": 4, **HYPER.get(variant, {})}
    return lorazoo.inject(model, variant, targets=["0", "2"], name=name, **hyper)


def batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(1000 * step + rank))


def probe() -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(77))


def tensors_of(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {
        f"{p}.{k}": v.detach().clone()
        for p, h in hosts(model)
        if name in h.adapters
        for k, v in h.adapters[name].named_parameters()
    }


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


# ---- one process: inactive adapters are frozen ------------------------------------------------


def flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def grouped(model: nn.Module) -> set[int]:
    return {id(p) for g in lorazoo.param_groups(model, lr=1e-3) for p in g["params"]}


def two_adapters() -> nn.Module:
    model = adapt(make_model(), "lora", name="a")
    return adapt(model, "dora", name="b")


def test_inactive_adapters_are_frozen_and_get_their_flags_back() -> None:
    """An inactive adapter has ``requires_grad=False`` on every tensor, is in no optimizer group
    and not counted as trainable; active again, it gets exactly the flags it had, including a
    tensor the user froze."""
    model = two_adapters()
    frozen_by_user = model[0].adapters["a"].lora_A
    frozen_by_user.requires_grad_(False)
    start = flags(model)
    a = {id(p) for _, h in hosts(model) for p in h.adapters["a"].parameters()}
    b = {id(p) for _, h in hosts(model) for p in h.adapters["b"].parameters()}
    n_b = sum(p.numel() for _, h in hosts(model) for p in h.adapters["b"].parameters())

    lorazoo.set_active(model, "b")
    assert not any(p.requires_grad for p in model.parameters() if id(p) in a)
    assert grouped(model) == b
    assert lorazoo.trainable(model).trainable == n_b
    lorazoo.set_active(model, "a")
    assert not any(p.requires_grad for p in model.parameters() if id(p) in b)
    assert grouped(model) == a - {id(frozen_by_user)}
    assert not frozen_by_user.requires_grad
    lorazoo.set_active(model, ["a", "b"])
    assert flags(model) == start
    assert not frozen_by_user.requires_grad


def test_disabled_leaves_trainable_tensors_as_set_active_made_them() -> None:
    """``disabled`` is a view for evaluation: flags, counts and groups inside it are those
    outside; a ``set_active`` inside the block is undone with its freezing on exit."""
    model = two_adapters()
    x = probe()
    lorazoo.set_active(model, "a")
    outside = (flags(model), lorazoo.trainable(model), grouped(model))
    y = model(x)
    with lorazoo.disabled(model):
        assert (flags(model), lorazoo.trainable(model), grouped(model)) == outside
        with lorazoo.disabled(model):
            assert flags(model) == outside[0]
        assert flags(model) == outside[0]
        lorazoo.set_active(model, "b")
    assert [h.active for _, h in hosts(model)] == [("a",), ("a",)]
    assert (flags(model), lorazoo.trainable(model), grouped(model)) == outside
    assert torch.equal(model(x), y)


def test_set_active_is_all_or_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupt while set_active walks the layers leaves every layer's active adapters and
    every flag as before."""
    model = two_adapters()
    start = flags(model)
    second = hosts(model)[1][1]
    real = type(second).set_active

    def interrupted(self, *args, **kwargs):
        if self is second:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(second), "set_active", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lorazoo.set_active(model, "a")
    monkeypatch.undo()
    assert [h.active for _, h in hosts(model)] == [("a", "b"), ("a", "b")]
    assert [h.parked() for _, h in hosts(model)] == [frozenset(), frozenset()]
    assert flags(model) == start


def test_parking_survives_a_copy_and_eject_gives_the_flags_back() -> None:
    """The flags an inactive adapter had live with the model (a deep copy reactivates it
    correctly); ejecting an inactive adapter hands it back with its own flags."""
    import copy

    model = two_adapters()
    start = flags(model)
    lorazoo.set_active(model, "a")
    twin = copy.deepcopy(model)
    assert flags(twin) == flags(model) != start
    lorazoo.set_active(twin, ["a", "b"])
    assert flags(twin) == start
    b = model[0].adapters["b"]
    assert not any(p.requires_grad for p in b.parameters())
    lorazoo.eject(model, "b")
    assert all(p.requires_grad for p in b.parameters())


def test_save_and_load_through_a_data_parallel_wrapper(tmp_path: Path) -> None:
    """A file saved from a wrapped model holds the bare model's paths (no ``module.``), loads
    into the bare model, and loading into the wrapper returns the wrapper."""
    model = adapt(make_model(), "lora")
    lorazoo.testing.perturb(model, 3)
    wrapped = nn.DataParallel(model)
    path = lorazoo.save(wrapped, tmp_path / "a.safetensors")
    bare = make_model()
    lorazoo.load(bare, path)
    with torch.no_grad():
        assert torch.equal(bare(probe()), model(probe()))
    assert lorazoo.load(nn.DataParallel(make_model()), path).module is not None
    again = nn.DataParallel(adapt(make_model(), "lora"))
    assert lorazoo.load(again, path) is again
    with torch.no_grad():
        assert torch.equal(again(probe()), model(probe()))


def test_a_sharding_wrapper_can_free_the_whole_base_weight() -> None:
    """``fully_shard`` replaces the host's weight by its row shard; the whole weight must then
    be free (nothing else of lorazoo's keeps it), and eject still gives back the original
    module object with the host's tensors."""
    import gc
    import weakref

    model = make_model()
    layer = model[0]
    whole = weakref.ref(layer.weight)
    adapt(model, "lora")
    host = model[0]
    host.weight = nn.Parameter(host.weight.detach()[:8].clone(), requires_grad=False)  # a "shard"
    gc.collect()
    assert whole() is None, "the replaced base weight is still referenced"
    lorazoo.eject(model)
    assert model[0] is layer and layer.weight is host.weight and layer.bias is host.bias


def test_save_through_a_compiled_model_writes_bare_paths(tmp_path: Path) -> None:
    """``torch.compile`` puts the model under ``_orig_mod``; its file loads into the bare
    model."""
    model = adapt(make_model(), "lora")
    lorazoo.testing.perturb(model, 5)
    path = lorazoo.save(torch.compile(model), tmp_path / "c.safetensors")
    bare = lorazoo.load(make_model(), path)
    with torch.no_grad():
        assert torch.equal(bare(probe()), model(probe()))


# ---- running two processes -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(scenario: str, out: Path) -> list[dict[str, Any]]:
    """Run ``scenario`` on two processes; their results, by rank. A run still going after
    :data:`TIMEOUT_S` is killed and the test fails."""
    # every CPU build of torch the project supports has gloo: its absence is a failure, not a skip
    assert torch.distributed.is_available() and torch.distributed.is_gloo_available(), (
        "this torch build has no torch.distributed gloo backend"
    )
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    logs = [out / f"{scenario}-{rank}.log" for rank in range(WORLD)]
    procs = []
    try:
        for rank in range(WORLD):
            with logs[rank].open("w") as log:
                cmd = [sys.executable, __file__, scenario, str(rank), str(WORLD), str(port), str(out)]
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + TIMEOUT_S
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{scenario}: the {WORLD} processes did not finish within {TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"{scenario}: rank {rank} failed:\n" + logs[rank].read_text()[-4000:]
    return [torch.load(out / f"{scenario}-{rank}.pt") for rank in range(WORLD)]


# ---- workers (run in the subprocesses) -------------------------------------------------------


def worker_ddp(rank: int, out: Path) -> dict[str, Any]:
    """Per variant: adapters "a" (the variant) and "b" (LoRA) on the same layers, "b" inactive,
    DistributedDataParallel with default arguments, SGD for a few steps. Then the wrapper saves
    "a" and loads the file back into itself."""
    result: dict[str, Any] = {}
    for variant in DDP_VARIANTS:
        model = adapt(make_model(), variant, name="a")
        adapt(model, "lora", name="b")
        lorazoo.set_active(model, "a")
        b0 = tensors_of(model, "b")
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(lorazoo.param_groups(model, lr=0.05))
        losses = []
        for step in range(STEPS):
            loss = ddp(batch(rank, step)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
        with torch.no_grad():
            y = ddp(probe())
        path = out / f"ddp-{variant}-{rank}.safetensors"
        lorazoo.save(ddp, path, name="a")
        trained = tensors_of(model, "a")
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.zero_()
        assert lorazoo.load(ddp, path, name="a") is ddp
        reloaded = tensors_of(model, "a")
        result[variant] = {
            "losses": losses,
            "a": trained,
            "b_moved": [k for k, v in tensors_of(model, "b").items() if not torch.equal(v, b0[k])],
            "reloaded": all(torch.equal(reloaded[k], v) for k, v in trained.items()),
            "y": y,
            "file": str(path),
        }
    return result


def worker_fsdp(rank: int, out: Path) -> dict[str, Any]:
    """Per variant: the model sharded with fully_shard (each adapted layer and the root),
    trained a few steps; saved; merged and unmerged on the shards; and a second sharded model
    loading the file."""
    from torch.distributed.fsdp import fully_shard

    from lorazoo.engine.distributed import full_tensor

    def shard(model: nn.Module, per_layer: bool) -> nn.Module:
        if per_layer:  # else the root alone, which keeps its parameters whole after a forward
            fully_shard(model[0])
            fully_shard(model[2])
        return fully_shard(model)

    def whole_weights(model: nn.Module) -> list[torch.Tensor]:
        return [full_tensor(h.weight).clone() for _, h in hosts(model)]

    result: dict[str, Any] = {}
    for variant in FSDP_VARIANTS:
        per_layer = variant == "lora"
        model = shard(adapt(make_model(), variant), per_layer)
        opt = torch.optim.SGD(lorazoo.param_groups(model, lr=0.05))
        for step in range(STEPS):
            loss = model(batch(rank, step)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            y = model(probe())  # the root keeps its parameters whole after this forward
        path = out / f"fsdp-{variant}.safetensors"
        lorazoo.save(model, path)  # every rank: it gathers
        before = whole_weights(model)
        lorazoo.merge(model)
        merged_weights = whole_weights(model)
        with torch.no_grad():
            y_merged = model(probe())
        lorazoo.unmerge(model)
        after = whole_weights(model)
        with torch.no_grad():
            y_after = model(probe())
        fresh = shard(adapt(make_model(), variant), per_layer)
        lorazoo.load(fresh, path)
        with torch.no_grad():
            y_loaded = fresh(probe())
        refused = []
        for action in (partial(lorazoo.inject, fresh, "lora", name="more"), partial(lorazoo.eject, fresh)):
            try:
                action()
            except lorazoo.LorazooError as exc:
                refused.append(str(exc))
        with torch.no_grad():
            y_refused = fresh(probe())
        result[variant] = {
            "y": y,
            "y_merged": y_merged,
            "y_after": y_after,
            "y_loaded": y_loaded,
            "merge_moved": [not torch.equal(m, b) for m, b in zip(merged_weights, before, strict=True)],
            "exact": [torch.equal(bits(a), bits(b)) for a, b in zip(after, before, strict=True)],
            "file": str(path),
            "refused": refused,
            "unchanged_by_refusals": torch.equal(y_refused, y_loaded),
            "adapters_after_refusals": lorazoo.adapter_names(fresh),
        }
    return result


def _main(scenario: str, rank: str, world: str, port: str, out: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = port
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=int(rank), world_size=int(world))
    try:
        work = {"ddp": worker_ddp, "fsdp": worker_fsdp}[scenario]
        result = work(int(rank), Path(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out) / f"{scenario}-{rank}.pt")


# ---- two-process tests -----------------------------------------------------------------------


def single_process_reference(variant: str) -> dict[str, torch.Tensor]:
    """Adapter "a" trained on one process on the two ranks' batches together: what DDP's
    gradient averaging must reproduce (equal per-rank batch sizes, mean losses)."""
    model = adapt(make_model(), variant, name="a")
    adapt(model, "lora", name="b")
    lorazoo.set_active(model, "a")
    opt = torch.optim.SGD(lorazoo.param_groups(model, lr=0.05))
    for step in range(STEPS):
        x = torch.cat([batch(rank, step) for rank in range(WORLD)])
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return tensors_of(model, "a")


def test_ddp_default_arguments_with_an_inactive_adapter(tmp_path: Path) -> None:
    """Every variant trains under DDP (default arguments) beside an inactive second adapter: all
    steps on both ranks, identical tensors on both ranks, equal to one process training on the
    whole batch; the inactive adapter does not move. The wrapper's file loads into the bare
    model (no ``module.`` prefix) and gives the wrapper's outputs; loading into the wrapper
    restores the tensors."""
    ranks = spawn("ddp", tmp_path)
    for variant in DDP_VARIANTS:
        r0, r1 = ranks[0][variant], ranks[1][variant]
        assert len(r0["losses"]) == len(r1["losses"]) == STEPS
        assert r0["a"].keys() == r1["a"].keys() and r0["a"]
        for key, t in r0["a"].items():
            assert torch.equal(bits(t), bits(r1["a"][key])), f"{variant}: {key} differs between ranks"
        assert r0["b_moved"] == r1["b_moved"] == [], f"{variant}: the inactive adapter moved"
        assert r0["reloaded"] and r1["reloaded"], f"{variant}: load into the DDP wrapper"
        ref = single_process_reference(variant)
        init = tensors_of(adapt(make_model(), variant, name="a"), "a")
        assert any(not torch.equal(t, init[k]) for k, t in r0["a"].items()), f"{variant}: nothing trained"
        for key, t in r0["a"].items():
            torch.testing.assert_close(t, ref[key], rtol=1e-5, atol=1e-6, msg=f"{variant}: {key}")
        bare = make_model()
        lorazoo.load(bare, r0["file"], name="a")
        with torch.no_grad():
            torch.testing.assert_close(bare(probe()), r0["y"], rtol=0, atol=0)


def test_fsdp2_train_save_reload_merge_unmerge(tmp_path: Path) -> None:
    """FSDP2 on two processes, sharded per layer (LoRA) and at the root only (DoRA): the file
    saved from the sharded model loads on one process into the bare model and gives the
    sharded model's outputs; it also loads into a sharded model; merge on the shards gives
    the unmerged outputs within rounding and unmerge brings every weight back bit for bit;
    inject and eject on a sharded model are refused with the model unchanged."""
    ranks = spawn("fsdp", tmp_path)
    for variant in FSDP_VARIANTS:
        r0, r1 = ranks[0][variant], ranks[1][variant]
        assert torch.equal(r0["y"], r1["y"]), f"{variant}: the ranks' models differ"
        for r in (r0, r1):
            assert all(r["merge_moved"]), f"{variant}: merge left a weight unchanged"
            assert all(r["exact"]), f"{variant}: unmerge did not restore the weights bit for bit"
            torch.testing.assert_close(r["y_merged"], r["y"], rtol=1e-5, atol=1e-5)
            assert torch.equal(r["y_after"], r["y"])
            assert torch.equal(r["y_loaded"], r["y"])
            assert len(r["refused"]) == 2, f"{variant}: inject/eject on a sharded model not refused"
            assert all("before calling fully_shard" in m or "before sharding" in m for m in r["refused"])
            assert r["unchanged_by_refusals"] and r["adapters_after_refusals"] == {"default": variant}
        bare = make_model()
        lorazoo.load(bare, r0["file"])
        with torch.no_grad():
            assert torch.equal(bare(probe()), r0["y"])


if __name__ == "__main__":
    _main(*sys.argv[1:])
