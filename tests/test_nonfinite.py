"""Every gradient hook: an inf/NaN gradient on one rank reaches every rank (so GradScaler skips
the step everywhere) and no memory takes it in."""

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_hooks as dh
from ddp_hooks.testing import run_world

from models import batches

HOOKS = {
    "fp32": lambda ddp, opt: dh.AllReduce().register(ddp, opt),
    "fp16": lambda ddp, opt: dh.FP16Compress().register(ddp, opt),
    "powersgd": lambda ddp, opt: dh.PowerSGD(rank=2).register(ddp, opt),
    "cser": lambda ddp, opt: dh.CSER(grad_ratio=4, model_ratio=2, period=100).register(ddp, opt),
    "qsparse-h1": lambda ddp, opt: dh.QsparseLocalSGD("signtopk", k=0.2, period=1).register(ddp, opt),
}


def _world(rank, world, name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 5))
    ddp = DDP(model, bucket_cap_mb=0.001)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    state = HOOKS[name](ddp, opt)
    finite, memories = [], []
    for t, (x, y) in enumerate(batches(rank, 5)):
        if t == 2 and rank == 1:
            x = x.clone()
            x[0, 0] = float("inf")
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        finite.append(all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()))
        memories.append(state.state_dict()["memory"])
        if finite[-1]:  # what GradScaler does
            opt.step()
    return finite, memories


@pytest.mark.device_branches
@pytest.mark.parametrize("name", list(HOOKS))
def test_non_finite_gradient_reaches_every_rank_and_spares_memory(name):
    for finite, memories in run_world(_world, 2, name):
        assert finite == [True, True, False, True, True]
        for slot, tensors in memories[-1].items():
            assert all(torch.isfinite(t).all() for t in tensors.values()), slot
        for slot in memories[2]:
            if slot == "q":  # the warm-start factor may move; it must stay finite
                continue
            before, during = memories[1][slot], memories[2][slot]
            assert all(torch.equal(before[n], during[n]) for n in before), slot


# ---------------------------------------------------------------- a finite spike
SPIKE_HOOKS = ["fp16", "ef-sgdm", "powersgd", "cser", "qsparse", "laq"]


def _spike_world(rank, world, name, kind):
    from ddp_hooks import catalog

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 5))
    ddp = DDP(model, bucket_cap_mb=0.001)
    setup = catalog.build(name, ddp, 0.05)
    losses, skipped = [], []
    teacher = torch.randn(16, 5, generator=torch.Generator().manual_seed(7))  # learnable labels
    for t, (x, _) in enumerate(batches(rank, 40, batch=32)):
        y = (x @ teacher).argmax(1)
        scale = 1.0
        if t == 10 and rank == 1:
            if kind == "spike":
                scale = 1e20  # one step of finite gradients around 1e19-1e20
            else:
                x = x.clone()
                x[0, 0] = float("inf")
        setup.optimizer.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x), y)
        (loss * scale).backward()
        finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        skipped.append(not finite)
        if finite:  # what GradScaler does
            setup.optimizer.step()
        losses.append(float(loss))
    memory = setup.state.state_dict()["memory"]
    return [p.detach().clone() for p in model.parameters()], skipped, losses, memory


@pytest.mark.parametrize("name", SPIKE_HOOKS)
def test_a_finite_spike_is_skipped_like_an_inf_and_training_goes_on(name):
    spike = run_world(_spike_world, 2, name, "spike")
    inf = run_world(_spike_world, 2, name, "inf")
    for (params, skipped, losses, memory), (params_inf, skipped_inf, _, _) in zip(spike, inf):
        assert skipped == skipped_inf == [t == 10 for t in range(40)], "every rank skips that one step"
        assert all(torch.equal(a, b) for a, b in zip(params, params_inf)), "exactly as an inf would be"
        for slot, tensors in memory.items():
            assert all(torch.isfinite(v).all() for v in tensors.values()), slot
        assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, "and training goes on"
