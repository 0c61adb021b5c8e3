"""AdaLoRA: the whole schedule through a plain loop, the importance statistics against the
paper's formulas written out literally, exact budgets, files with real ranks, and PEFT's
schedule."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from lorazoo_plugins import adalora as ada
from torch import nn

import lorazoo


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.a = nn.Linear(12, 16, dtype=dtype)
        self.b = nn.Linear(16, 16, dtype=dtype)
        self.c = nn.Linear(16, 6, dtype=dtype)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


TARGETS = [nn.Linear]


def make(seed: int = 0, dtype: torch.dtype = torch.float32, **hyper):
    torch.manual_seed(seed)
    model = Net(dtype)
    base = copy.deepcopy(model)
    lorazoo.inject(model, "adalora", targets=TARGETS, **hyper)
    return model, base


def data(seed: int = 1, n: int = 32, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g).to(dtype), torch.randn(n, 6, generator=g).to(dtype)


def adapters(model):
    return [a for _, _, a in lorazoo.engine.iter_adapters(model)]


def nonzero_lambdas(model) -> int:
    return sum(int((a.lora_E != 0).sum()) for a in adapters(model))


def literal_budget(step: int, b0: int, bT: int, t_init: int, t_final: int, total: int) -> int:
    """The paper's cubic schedule, floored as PEFT floors it."""
    if step <= t_init:
        return b0
    if step >= total - t_final:
        return bT
    frac = (step - t_init) / (total - t_init - t_final)
    return math.floor(bT + (b0 - bT) * (1 - frac) ** 3)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


# ------------------------------------------------------------------------------------------
# The whole schedule through the documented plain loop
# ------------------------------------------------------------------------------------------

T, T_INIT, T_FINAL, DELTA = 40, 3, 6, 2
HYPER = dict(r=6, target_r=2, t_init=T_INIT, t_final=T_FINAL, delta_t=DELTA)


def test_plain_loop_follows_the_budget_and_saves_real_ranks(tmp_path):
    model, base = make(**HYPER)
    x, y = data()
    opt = torch.optim.AdamW(lorazoo.param_groups(model, lr=2e-2))
    handle = lorazoo.attach(model, opt, total_steps=T)
    n = len(adapters(model))
    b0, bT = 6 * n, 2 * n
    final = T - T_FINAL
    masked_at = []
    for step in range(T):
        loss = (model(x) - y).pow(2).mean() + lorazoo.extra_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if T_INIT < step < final and step % DELTA == 0:
            want = literal_budget(step, b0, bT, T_INIT, T_FINAL, T)
            assert nonzero_lambdas(model) == want, step
            masked_at.append(step)
        if step == final:
            assert nonzero_lambdas(model) == bT
            assert sum(a.rank for a in adapters(model)) == bT  # shrunk, not just masked
    assert handle.step == T
    assert nonzero_lambdas(model) == bT
    history = ada.rank_history(model)
    assert [h["step"] for h in history] == [*masked_at, final]
    assert history[-1]["final"] and sum(history[-1]["ranks"].values()) == bT
    ranks = {p: a.rank for p, _, a in lorazoo.engine.iter_adapters(model)}
    assert len(set(ranks.values())) > 1 or n == 1  # the budget is allocated, not spread evenly
    # the optimizer's state shrank with the tensors
    for a in adapters(model):
        for p in (a.lora_A, a.lora_E, a.lora_B):
            assert opt.state[p]["exp_avg"].shape == p.shape
    # the file holds exactly the kept ranks; a fresh load reproduces the outputs bit for bit
    path = lorazoo.save(model, tmp_path / "ada.safetensors")
    _, tensors = lorazoo.io.read(path)
    for p, r in ranks.items():
        assert tensors[f"{p}.lora_A"].shape[0] == r and tensors[f"{p}.lora_B"].shape[1] == r
        assert tensors[f"{p}.lora_E"].shape == (r, 1)
    lorazoo.load(base, path)
    model.eval()
    base.eval()
    with torch.no_grad():
        out = model(x)
        again = base(x)
    assert torch.equal(bits(out), bits(again))
    assert {p: a.rank for p, _, a in lorazoo.engine.iter_adapters(base)} == ranks
    assert lorazoo.trainable(base).trainable == lorazoo.trainable(model).trainable
    # merge within tolerance, unmerge exact, at the shrunk ranks
    before = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    lorazoo.merge(model)
    with torch.no_grad():
        merged = model(x)
    assert torch.allclose(merged, out, atol=1e-5, rtol=1e-5)
    lorazoo.unmerge(model)
    for k, v in before.items():
        assert torch.equal(bits(model.state_dict()[k]), bits(v)), k


def test_after_step_loop_without_the_optimizer_still_shrinks_its_state():
    model, _ = make(**HYPER)
    x, y = data()
    opt = torch.optim.Adam(lorazoo.param_groups(model, lr=2e-2))
    params = [p for g in opt.param_groups for p in g["params"]]  # kept across the shrink
    for step in range(T):
        loss = (model(x) - y).pow(2).mean() + lorazoo.extra_loss(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lorazoo.after_step(model, step, total_steps=T)
        opt.zero_grad()
    n = len(adapters(model))
    assert nonzero_lambdas(model) == sum(a.rank for a in adapters(model)) == 2 * n
    for a in adapters(model):
        assert opt.state[a.lora_A]["exp_avg"].shape == a.lora_A.shape
    assert not ada._PENDING and not ada._GLOBAL_HOOK  # the one-off hook took itself off


def test_a_loop_without_hooks_is_reported_once():
    model, _ = make(**HYPER, total_steps=T)
    x, y = data()
    opt = torch.optim.AdamW(lorazoo.param_groups(model, lr=1e-2))
    raised_at = []
    for step in range(3 * ada.UNHOOKED_LIMIT):
        try:
            loss = (model(x) - y).pow(2).mean()
        except ada.AdaLoraHooksError as exc:
            assert "lorazoo.attach(model, optimizer" in str(exc) and "after_step" in str(exc)
            raised_at.append(step)
            continue
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert raised_at == [ada.UNHOOKED_LIMIT + 1]
    # gradient accumulation (several forwards per step) and evaluation are not counted
    model2, _ = make(**HYPER, total_steps=T)
    opt2 = torch.optim.AdamW(lorazoo.param_groups(model2, lr=1e-2))
    lorazoo.attach(model2, opt2)
    for _ in range(3 * ada.UNHOOKED_LIMIT):
        for _ in range(3):
            (model2(x) - y).pow(2).mean().backward()
        opt2.step()
        opt2.zero_grad()


def test_total_steps_may_come_late_and_is_checked_then():
    model, _ = make(**HYPER)
    x, y = data()
    opt = torch.optim.SGD(lorazoo.param_groups(model, lr=1e-2))
    handle = lorazoo.attach(model, opt)
    n = len(adapters(model))
    with pytest.warns(ada.AdaLoraWarning, match="total_steps"):
        for _ in range(2):
            (model(x) - y).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert sum(a.rank for a in adapters(model)) == 6 * n and not ada.rank_history(model)
    # a length that leaves no budgeting phase fails before the update
    handle.total_steps = T_INIT + T_FINAL
    (model(x) - y).pow(2).mean().backward()
    snapshot = [p.detach().clone() for a in adapters(model) for p in a.parameters()]
    with pytest.raises(lorazoo.ConfigError, match="no budgeting phase"):
        opt.step()
    now = [p for a in adapters(model) for p in a.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(snapshot, now, strict=True))
    opt.zero_grad()
    handle.total_steps = T
    for _ in range(T - 2):
        (model(x) - y).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert sum(a.rank for a in adapters(model)) == 2 * n
    with pytest.raises(lorazoo.LorazooError, match="already attached"):
        lorazoo.attach(model, opt)
    with pytest.warns(UserWarning, match="ignored"):
        lorazoo.after_step(model, 0)


def test_a_scheduler_gives_the_length():
    model, _ = make(**HYPER)
    opt = torch.optim.SGD(lorazoo.param_groups(model, lr=1e-2))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=T)
    assert lorazoo.attach(model, opt, total_steps=sched).total_steps == T
    with pytest.raises(lorazoo.LorazooError, match="positive integer"):
        lorazoo.attach(model, torch.optim.SGD(lorazoo.param_groups(model, lr=1e-2)), total_steps=0)


def test_attach_is_a_valid_no_op_for_variants_without_step_work():
    torch.manual_seed(0)
    model = Net()
    lorazoo.inject(model, "lora", targets=TARGETS, r=2)
    opt = torch.optim.SGD(lorazoo.param_groups(model, lr=1e-2))
    handle = lorazoo.attach(model, opt)
    x, y = data()
    (model(x) - y).pow(2).mean().backward()
    opt.step()
    assert handle.step == 1
    handle.remove()
    assert not handle.live


# ------------------------------------------------------------------------------------------
# Importance statistics against the paper's formulas, written out
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_importance_matches_the_papers_formulas(dtype):
    beta1, beta2 = 0.8, 0.7
    model, _ = make(r=4, target_r=2, beta1=beta1, beta2=beta2, t_init=100, dtype=dtype)
    x, y = data(dtype=dtype)
    opt = torch.optim.AdamW(lorazoo.param_groups(model, lr=1e-2))
    seen = []  # (weights, grads) before each update, in fp64

    def capture(optimizer, args, kwargs):
        seen.append(
            [
                [
                    (p.detach().double().clone(), p.grad.double().clone())
                    for p in (a.lora_A, a.lora_E, a.lora_B)
                ]
                for a in adapters(model)
            ]
        )

    opt.register_step_pre_hook(capture)
    lorazoo.attach(model, opt, total_steps=200)
    for _ in range(6):
        (model(x).float() - y.float()).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for k, a in enumerate(adapters(model)):
        ibar = [torch.zeros_like(w) for w, _ in seen[0][k]]
        ubar = [torch.zeros_like(w) for w, _ in seen[0][k]]
        for step in seen:
            for j, (w, g) in enumerate(step[k]):
                sens = (w * g).abs()  # I(w) = |w · ∂L/∂w|
                ibar[j] = beta1 * ibar[j] + (1 - beta1) * sens
                ubar[j] = beta2 * ubar[j] + (1 - beta2) * (sens - ibar[j]).abs()
        assert all(t.dtype == torch.float32 for t in (*a.stats[0], *a.stats[1]))
        for j in range(3):
            torch.testing.assert_close(a.stats[0][j].double(), ibar[j], rtol=1e-5, atol=1e-12)
            torch.testing.assert_close(a.stats[1][j].double(), ubar[j], rtol=1e-5, atol=1e-12)
        s = [ib * ub for ib, ub in zip(ibar, ubar, strict=True)]
        score = s[1].view(-1) + s[0].mean(dim=1) + s[2].mean(dim=0)
        torch.testing.assert_close(ada.triplet_scores(a).double(), score, rtol=1e-5, atol=1e-14)


# ------------------------------------------------------------------------------------------
# Exact budgets
# ------------------------------------------------------------------------------------------


def test_ties_keep_exactly_the_budget_lowest_position_first():
    keep = ada.select(torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5, float("nan")]), 3)
    assert keep.tolist() == [False, True, True, True, False, False]
    keep = ada.select(torch.tensor([1.0, 1.0, 1.0, 1.0]), 2)
    assert keep.tolist() == [True, True, False, False]
    assert ada.select(torch.zeros(5), 5).all() and not ada.select(torch.zeros(5), 0).any()
    model, _ = make(r=4, target_r=2)  # no statistics yet: every score is 0
    for a in adapters(model):
        nn.init.normal_(a.lora_E)
    masks = ada.mask_to_budget(adapters(model), 5)
    assert nonzero_lambdas(model) == 5 and [int(m.sum()) for m in masks] == [4, 1, 0]


def test_equal_initial_and_target_rank_trains_without_allocating():
    model, _ = make(r=3, target_r=3, total_steps=10)
    x, y = data()
    opt = torch.optim.AdamW(lorazoo.param_groups(model, lr=1e-2))
    lorazoo.attach(model, opt)
    for _ in range(10):
        (model(x) - y).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(a.rank == 3 for a in adapters(model)) and nonzero_lambdas(model) == 9


def test_layers_pruned_to_rank_zero_save_and_load(tmp_path):
    model, base = make(r=3, target_r=1)
    for a in adapters(model):
        nn.init.normal_(a.lora_E)
        a.stats = ([torch.zeros_like(p, dtype=torch.float32) for p in a.parameters()],) * 2
    first = adapters(model)[0]
    first.stats = (
        [torch.ones_like(p, dtype=torch.float32) for p in (first.lora_A, first.lora_E, first.lora_B)],
    ) * 2
    masks = ada.mask_to_budget(adapters(model), 3)
    ada.shrink(adapters(model), masks, None)
    assert [a.rank for a in adapters(model)] == [3, 0, 0]
    x, _ = data()
    path = lorazoo.save(model, tmp_path / "a.safetensors")
    lorazoo.load(base, path)
    model.eval()
    base.eval()
    with torch.no_grad():
        assert torch.equal(bits(model(x)), bits(base(x)))


def test_a_file_rank_out_of_range_is_refused():
    model, _ = make(r=3)
    with pytest.raises(lorazoo.AdapterFileError, match="between 0"):
        adapters(model)[0].from_file({"adalora_rank": 7})


def test_under_distributed_every_rank_keeps_rank_zeros_mask(monkeypatch):
    """Scores are averaged over ranks, then rank 0's mask is broadcast."""
    dist = torch.distributed
    other = torch.tensor([0.0, 0.0, 10.0, 0.0])  # what the other process scored
    calls = []

    def all_reduce(t, op=None):
        calls.append("all_reduce")
        t.add_(other)

    def broadcast(t, src):
        calls.append(("broadcast", src))
        t.copy_(torch.tensor([1, 0, 1, 0], dtype=t.dtype))  # rank 0's decision wins

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "broadcast", broadcast)
    mine = torch.tensor([4.0, 3.0, 0.0, 1.0])
    keep = ada.select(mine, 2)
    assert calls == ["all_reduce", ("broadcast", 0)]
    assert keep.tolist() == [True, False, True, False]
    assert mine.tolist() == [4.0, 3.0, 0.0, 1.0]  # the caller's scores are not changed


# ------------------------------------------------------------------------------------------
# The orthogonality penalty
# ------------------------------------------------------------------------------------------


def test_orthogonality_penalty_paper_and_peft_forms():
    for form, weight in (("paper", 0.1), ("peft", 0.5)):
        model, _ = make(r=4, orth_reg_weight=weight, orth_reg_form=form)
        got = lorazoo.extra_loss(model)
        terms = []
        for a in adapters(model):
            A, B = a.lora_A.double(), a.lora_B.double()
            for gram in (B.T @ B, A @ A.T):
                d = torch.linalg.norm(gram - torch.eye(gram.shape[0], dtype=torch.float64))
                terms.append(d**2 if form == "paper" else d)
        want = weight * sum(terms) if form == "paper" else weight * sum(terms) / len(terms)
        assert got.requires_grad
        assert float(got.detach()) == pytest.approx(float(want), rel=1e-5)
    model, _ = make(r=4, orth_reg_weight=0.0)
    assert lorazoo.extra_loss(model) is None


def test_config_is_checked():
    with pytest.raises(lorazoo.ConfigError, match="target_r"):
        make(r=4, target_r=5)
    with pytest.raises(lorazoo.ConfigError, match="no budgeting phase"):
        make(r=4, total_steps=5, t_init=3, t_final=2)
    with pytest.raises(lorazoo.ConfigError, match="orth_reg_form"):
        make(r=4, orth_reg_form="mean")
    cfg = ada.AdaLoraConfig()
    assert (cfg.r, cfg.final_r, cfg.orth_reg_weight) == (12, 8, 0.1)
    assert ada.AdaLoRA.bench_kwargs(8) == {"r": 12, "target_r": 8}
    assert ada.AdaLoRA.bench_kwargs(3) == {"r": 5, "target_r": 3}


# ------------------------------------------------------------------------------------------
# Against PEFT's AdaLoRA
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t_init, t_final, delta_t, total", [(0, 1, 1, 30), (3, 5, 2, 40), (10, 10, 5, 100)])
def test_budget_schedule_is_peft_s(t_init, t_final, delta_t, total):
    peft = pytest.importorskip("peft")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(16, 16)
            self.v = nn.Linear(16, 16)

    cfg = peft.AdaLoraConfig(
        init_r=6,
        target_r=2,
        tinit=t_init,
        tfinal=t_final,
        deltaT=delta_t,
        total_step=total,
        target_modules=["q", "v"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(Tiny(), cfg)
    alloc = pm.base_model.rankallocator
    ours = ada.AdaLoraConfig(
        r=6, target_r=2, t_init=t_init, t_final=t_final, delta_t=delta_t, total_steps=total
    )
    assert (alloc.init_bgt, alloc.target_bgt) == (12, 4)
    for step in range(total):
        theirs = alloc.budget_schedule(step)
        mine = ada.budget_schedule(step, 12, 4, ours, total)
        assert mine[0] == theirs[0], step
        if step < total - t_final:
            assert mine[1] == theirs[1], step
    assert ada.final_step(ours, total) == total - t_final


def test_same_masks_as_peft_with_after_step():
    """Both score from the weights after the update here; in fp64 the runs agree on every mask."""
    peft = pytest.importorskip("peft")
    total, t_init, t_final, delta_t = 16, 2, 3, 2

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 8, dtype=torch.float64)
            self.v = nn.Linear(8, 4, dtype=torch.float64)

        def forward(self, x):
            return self.v(torch.tanh(self.q(x)))

    torch.manual_seed(0)
    base = Tiny()
    cfg = peft.AdaLoraConfig(
        init_r=4,
        target_r=2,
        lora_alpha=8,
        tinit=t_init,
        tfinal=t_final,
        deltaT=delta_t,
        total_step=total,
        target_modules=["q", "v"],
        orth_reg_weight=0.0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    ours = copy.deepcopy(base)
    lorazoo.inject(
        ours, "adalora", targets=["q", "v"], r=4, target_r=2, t_init=t_init, t_final=t_final, delta_t=delta_t
    )
    with torch.no_grad():  # the same starting tensors
        for path in ("q", "v"):
            theirs = pm.base_model.model.get_submodule(path)
            mine = ours.get_submodule(path).adapters["default"]
            for t in ("lora_A", "lora_B", "lora_E"):
                getattr(mine, t).copy_(getattr(theirs, t)["default"])
    g = torch.Generator().manual_seed(3)
    x, y = (
        torch.randn(16, 8, generator=g, dtype=torch.float64),
        torch.randn(16, 4, generator=g, dtype=torch.float64),
    )
    opt_p = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    opt_o = torch.optim.SGD(lorazoo.param_groups(ours, lr=0.5))
    for step in range(total):
        (pm(x) - y).pow(2).mean().backward()
        opt_p.step()
        pm.base_model.update_and_allocate(step)
        opt_p.zero_grad()
        (ours(x) - y).pow(2).mean().backward()
        opt_o.step()
        lorazoo.after_step(ours, step, total_steps=total)
        opt_o.zero_grad()
        theirs = {
            p: int((pm.base_model.model.get_submodule(p).lora_E["default"] != 0).sum()) for p in ("q", "v")
        }
        assert ada.ranks(ours) == theirs, step


# ------------------------------------------------------------------------------------------
# Two real processes (gloo): different data on each, the same masks everywhere
# ------------------------------------------------------------------------------------------


T_DIST = 12


def _distributed_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model, _ = make(**HYPER)
        x, y = data(seed=10 + rank)  # each process sees other data: its own scores differ
        opt = torch.optim.AdamW(lorazoo.param_groups(model, lr=2e-2))
        lorazoo.attach(model, opt, total_steps=T_DIST)
        kept = []
        for _ in range(T_DIST):
            (model(x) - y).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            kept.append(torch.cat([(a.lora_E != 0).view(-1) for a in adapters(model)]).clone())
        torch.save(kept, f"{out_dir}/kept{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_keep_the_same_triplets(tmp_path):
    # every CPU build of torch the project supports has gloo: its absence is a failure, not a skip
    assert torch.distributed.is_available() and torch.distributed.is_gloo_available(), (
        "this torch build has no torch.distributed gloo backend"
    )
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "kept0.pt")
    b = torch.load(tmp_path / "kept1.pt")
    assert len(a) == len(b) == T_DIST
    assert a[-1].numel() == int(a[-1].sum()) == 2 * 3  # shrunk to the final budget: 3 layers × 2
    for step, (ka, kb) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(ka, kb), step
