"""The outer optimizer of the local-step algorithms and the DiLoCo preset: every ``period``
inner steps, the pseudo-gradients ``x_global - x_i`` are averaged (compressed, with error
feedback, when a compressor is given) and an outer SGD step with Nesterov momentum moves the
global model; every worker starts its next inner steps from it. Against a single-process
reference written from the DiLoCo paper, on 2 and 4 ranks, with AdamW as the inner optimizer."""

import pytest
import torch
from test_qsparse import _Net
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_hooks as dh
from ddp_hooks.testing import run_world

from models import batches, params_of, value_errors

PERIOD, STEPS = 4, 12


def _inner(params):
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)


def _world(rank, world, outer_lr, outer_momentum):
    model = _Net()
    ddp = DDP(model)
    opt = _inner(ddp.parameters())
    state = dh.DiLoCo(period=PERIOD, outer_lr=outer_lr, outer_momentum=outer_momentum).register(ddp, opt)
    for x, y in batches(rank, STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    return params_of(model), state.stats()["total"]["sent_bytes"]


def diloco_reference(world, outer_lr, outer_momentum):
    """DiLoCo for ``world`` simulated workers: H inner AdamW steps on each worker's own data
    from the global model, then Delta = mean_i (x_global - x_i), m = mu m + Delta,
    x_global -= outer_lr (Delta + mu m) (Nesterov), and every worker restarts from x_global
    (its inner optimizer state carries on)."""
    models = [_Net() for _ in range(world)]
    inners = [_inner(m.parameters()) for m in models]
    x_global = [p.detach().clone() for p in models[0].parameters()]
    momentum = [torch.zeros_like(p) for p in x_global]
    data = [batches(r, STEPS) for r in range(world)]
    for t in range(STEPS):
        for i, (m, opt) in enumerate(zip(models, inners)):
            opt.zero_grad()
            nn.functional.cross_entropy(m(data[i][t][0]), data[i][t][1]).backward()
            opt.step()
        if (t + 1) % PERIOD:
            continue
        for k, x0 in enumerate(x_global):
            delta = torch.zeros_like(x0)
            for m in models:
                delta += (x0 - list(m.parameters())[k].detach()).reshape(-1).view_as(x0)
            delta /= world
            if outer_momentum:
                momentum[k] = momentum[k] * outer_momentum + delta
                delta = delta + outer_momentum * momentum[k]
            x0.add_(delta, alpha=-outer_lr)
            for m in models:
                with torch.no_grad():
                    list(m.parameters())[k].copy_(x0)
    return x_global


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("outer", [(0.7, 0.9), (1.0, 0.0)], ids=["nesterov", "averaging"])
def test_agrees_with_single_process_reference(world, outer):
    results = run_world(_world, world, *outer)
    expected = diloco_reference(world, *outer)
    for params, _ in results:
        for got, want in zip(params, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the outer step is not plain averaging: it moves further than the mean of the workers
    if outer[1]:
        plain = diloco_reference(world, 1.0, 0.0)
        assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(expected, plain))


def test_sends_the_dense_pseudo_gradient_once_per_period():
    (_, sent), _ = run_world(_world, 2, 0.7, 0.9)
    numel = sum(p.numel() for p in _Net().parameters())
    syncs = STEPS // PERIOD
    # fp32 values and a 4-byte flag per synchronization; the inner steps agree on one flag each
    assert sent == syncs * (4 * numel + 4) + STEPS * 4, sent


def test_bad_arguments_raise_value_error_naming_them():
    messages = value_errors(
        dh.DiLoCo,
        [{"period": 0}, {"outer_lr": 0.0}, {"outer_momentum": 1.0}, {"outer_momentum": -0.1}],
    )
    for message, name in zip(messages, ["period", "outer_lr", "outer_momentum", "outer_momentum"]):
        assert name in message, message
