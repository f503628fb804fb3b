"""Every gradient hook: an inf/NaN gradient on one rank reaches every rank (so GradScaler skips
the step everywhere) and no memory takes it in."""

import pytest
import torch
from models import batches
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_hooks as dh
from ddp_hooks.testing import run_world

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
