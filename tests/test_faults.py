"""A rank that dies or stalls in the middle of training: every survivor raises, soon, with an
error that names the collective, and no parameter is updated after the failure. Every
algorithm of the catalog, 3 ranks, rank 1 failing at step 10 before its forward, inside its
hook, or inside its optimizer step."""

import os
import time

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_hooks import catalog
from ddp_hooks.testing import run_world

HOOKS = list(catalog.ENTRIES)
VICTIM, AT = 1, 10


def _fault(mode, stall_s):
    if mode == "die":
        os._exit(7)
    time.sleep(stall_s)  # alive and silent, longer than the process group's timeout
    os._exit(8)


def _fault_world(rank, world, name, point, mode, stall_s=0.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))
    ddp = DDP(model, bucket_cap_mb=0.01)  # several buckets in flight
    setup = catalog.build(name, ddp, 0.05)
    victim = rank == VICTIM
    if victim and point == "hook":
        reduce = setup.state.reduce

        def failing(bucket, step):
            if step == AT:
                _fault(mode, stall_s)
            return reduce(bucket, step)

        setup.state.reduce = failing
    if victim and point == "optimizer":
        setup.optimizer.register_step_pre_hook(lambda *_: _fault(mode, stall_s) if setup.state.step == AT + 1 else None)
    g = torch.Generator().manual_seed(rank)
    for t in range(2 * AT):
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 5, (8,), generator=g)
        if victim and point == "forward" and t == AT:
            _fault(mode, stall_s)
        before = [p.detach().clone() for p in model.parameters()]
        start = time.monotonic()
        try:
            setup.optimizer.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            setup.optimizer.step()
        except Exception as exc:  # noqa: BLE001 - what the survivor saw is the result
            after = list(model.parameters())
            return {
                "failed_at": t,
                "seconds": time.monotonic() - start,
                "error": f"{type(exc).__name__}: {exc}",
                "finite": all(bool(torch.isfinite(p).all()) for p in after),
                "unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
            }
    return {"failed_at": None}


def _check_survivors(results, limit_s):
    survivors = [r for rank, r in enumerate(results) if rank != VICTIM]
    assert len(survivors) == 2
    for r in survivors:
        assert r["failed_at"] in (AT, AT + 1), r  # the step of the failure, or the next one
        assert r["seconds"] < limit_s, r
        assert r["finite"], r
        assert "ddp_hooks:" in r["error"] or "Connection closed" in r["error"] or "Timed out" in r["error"], r
    return survivors


@pytest.mark.parametrize("point", ["forward", "hook", "optimizer"])
@pytest.mark.parametrize("name", HOOKS)
def test_dead_peer_fails_every_survivor_fast(name, point):
    results = run_world(_fault_world, 3, name, point, "die", may_die=(VICTIM,), timeout=120)
    survivors = _check_survivors(results, limit_s=30)
    for r in survivors:
        if r["failed_at"] == AT and point != "optimizer":
            assert r["unchanged"], "a failed step must not move the model"


@pytest.mark.parametrize("name", HOOKS)
def test_stalled_peer_fails_every_survivor_at_the_process_group_timeout(name):
    timeout_s = 2
    results = run_world(
        _fault_world,
        3,
        name,
        "hook",
        "stall",
        2.5 * timeout_s + 1,
        may_die=(VICTIM,),
        timeout=120,
        group_timeout=timeout_s,
    )
    survivors = _check_survivors(results, limit_s=2.5 * timeout_s)  # the timeout, not the peer's exit
    assert all(r["seconds"] >= 0.8 * timeout_s or r["failed_at"] == AT + 1 for r in survivors)
