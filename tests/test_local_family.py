"""The local-step family beyond synchronous Qsparse-local-SGD: asynchronous schedules (each
worker synchronizes on its own steps with the master model), streaming fragments (with and
without a delayed exchange), SparseLoCo's decaying error feedback on 2-bit top-k
pseudo-gradients. Against a single-process reference written from the papers, on 2 and 4
ranks; bit-exact resume mid-schedule and with an exchange in flight; non-finite steps and
dead peers."""

import copy
import math
import os
import random

import pytest
import torch
from test_qsparse import _Net, _signtopk
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_hooks as dh
from ddp_hooks.algorithms.schedules import fragments
from ddp_hooks.compress.sparse_plan import MessagePlan
from ddp_hooks.testing import run_world

from models import batches, params_of, value_errors

OLD_TORCH = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 7)

PERIOD, STEPS = 4, 12


# ---------------------------------------------------------------- the reference
def _due(schedule, t, r, n, seed=0):
    """Whether worker r of n synchronizes after step t (the documented schedules)."""
    if schedule == "sync":
        return t % PERIOD == 0
    if schedule == "staggered":
        return t % PERIOD == (r * PERIOD // n) % PERIOD
    at, i = 0, 0
    while at < t:
        at += random.Random(f"{seed}/{r}/{i}").randint(math.ceil(PERIOD / 2), PERIOD)
        i += 1
    return at == t


def _two_bit_topk(v, k):
    """Top-k by magnitude, each kept value rounded to the nearest of {-1, -1/3, 1/3, 1} max|kept|."""
    out = torch.zeros_like(v)
    idx = torch.topk(v.abs(), k).indices
    m = v[idx].abs().max()
    codes = torch.round((v[idx] / m + 1) * 1.5).clamp(0, 3)
    out[idx] = (codes * (2 / 3) - 1) * m
    return out


def _sgdm(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _adamw(params):
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)


def family_reference(
    world,
    compress,
    inner,
    *,
    schedule="sync",
    groups=None,
    delay=0,
    mix=0.5,
    decay=1.0,
    outer=(1.0, 0.0),
    node_size=1,
):
    """n simulated workers, each with its own data and inner optimizer. After step t every due
    (fragment, workers) exchange launches: worker r sends q_r = C(decay mem_r + x_last_r - x_r)
    and keeps mem_r = that - q_r; ``delay`` steps later every rank's master takes the outer step
    on sum_r q_r / n (Nesterov with momentum outer[1]), and the due workers take the master
    (x_r = mix x_r + (1 - mix) master when delayed) and remember it as x_last_r. With
    ``node_size`` L, worker r is a node: its gradient is the mean of ranks r L ... r L + L - 1."""
    models = [_Net() for _ in range(world)]
    opts = [inner(m.parameters()) for m in models]
    tensors = lambda m: list(m.parameters())  # noqa: E731
    master = [p.detach().clone() for p in models[0].parameters()]
    x_last = [[p.clone() for p in master] for _ in range(world)]
    mem = [[torch.zeros_like(p) for p in master] for _ in range(world)]
    mom = [torch.zeros_like(p) for p in master]
    groups = groups or [list(range(len(master)))]
    data = [batches(r, STEPS) for r in range(world * node_size)]
    flights = []
    for t in range(1, STEPS + 1):
        for r, (m, opt) in enumerate(zip(models, opts)):
            opt.zero_grad()
            for j in range(r * node_size, (r + 1) * node_size):
                loss = nn.functional.cross_entropy(m(data[j][t - 1][0]), data[j][t - 1][1])
                (loss / node_size).backward()
            opt.step()
        for f, group in enumerate(groups):
            if len(groups) > 1:  # fragment f every PERIOD steps at offset f PERIOD / F, all workers
                workers = list(range(world)) if (t - f * PERIOD // len(groups)) % PERIOD == 0 else []
            else:
                workers = [r for r in range(world) if _due(schedule, t, r, world)]
            if not workers:
                continue
            sent = {}
            for r in workers:
                for k in group:
                    v = decay * mem[r][k] + x_last[r][k] - tensors(models[r])[k].detach()
                    q = compress(v.reshape(-1)).view_as(v)
                    sent[r, k] = (q, v - q)
            flights.append((t + delay, group, workers, sent))
        for flight in [fl for fl in flights if fl[0] == t]:
            flights.remove(flight)
            _, group, workers, sent = flight
            for k in group:
                mean = sum(sent[r, k][0] for r in workers) / world
                if outer[1]:
                    mom[k] = outer[1] * mom[k] + mean
                    mean = mean + outer[1] * mom[k]
                master[k] = master[k] - outer[0] * mean
                for r in workers:
                    mem[r][k] = sent[r, k][1]
                    x_last[r][k] = master[k].clone()
                    p = tensors(models[r])[k]
                    with torch.no_grad():
                        p.copy_(mix * p + (1 - mix) * master[k] if delay else master[k])
    return [[p.detach() for p in m.parameters()] for m in models]


# ---------------------------------------------------------------- the worlds
def _state(kind, **kw):
    if kind == "qsparse":
        return dh.QsparseLocalSGD("signtopk", k=10, period=PERIOD, **kw)
    if kind == "diloco":
        return dh.DiLoCo(period=PERIOD, outer_lr=0.7, outer_momentum=0.9, **kw)
    return dh.SparseLoCo(period=PERIOD, k=0.1, **kw)


def _inner_of(kind):
    return _sgdm if kind == "qsparse" else _adamw


def _world(rank, world, kind, kw, node_size=None):
    model = _Net()
    ddp = DDP(model, bucket_cap_mb=0.001)
    opt = _inner_of(kind)(ddp.parameters())
    state = _state(kind, node_size=node_size, **kw).register(ddp, opt)
    for x, y in batches(rank, STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    return params_of(model), state.stats()["total"]


def _check(results, expected):
    for rank, (params, _) in enumerate(results):
        for got, want in zip(params, expected[rank]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("schedule", ["staggered", "random"])
def test_asynchronous_qsparse_agrees_with_reference(world, schedule):
    results = run_world(_world, world, "qsparse", {"schedule": schedule})
    expected = family_reference(world, lambda v: _signtopk(v, 10), _sgdm, schedule=schedule)
    _check(results, expected)
    # the workers differ: each adopted the master at its own steps
    assert not torch.equal(results[0][0][0], results[1][0][0])
    # a worker's uplink: its own payloads only (one message per own sync) and one flag per step
    message = MessagePlan(list(_Net().parameters()), "signtopk", 10, 16).nbytes
    for rank, (_, total) in enumerate(results):
        syncs = sum(_due(schedule, t, rank, world) for t in range(1, STEPS + 1))
        assert syncs >= STEPS // PERIOD
        assert total["sent_bytes"] == syncs * message + STEPS * 4, (rank, total["sent_bytes"])


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("delay", [0, 1])
def test_streaming_diloco_agrees_with_reference(world, delay):
    sizes = [p.numel() for p in _Net().parameters()]
    groups = fragments(sizes, 2)
    assert groups == [[0], [1, 2, 3]]  # 384 | 24 + 120 + 5: consecutive, balanced as far as whole tensors go
    results = run_world(_world, world, "diloco", {"fragments": 2, "delay": delay, "mix": 0.25})
    expected = family_reference(world, lambda v: v, _adamw, groups=groups, delay=delay, mix=0.25, outer=(0.7, 0.9))
    _check(results, expected)
    # each fragment crosses alone: the peak step carries the larger fragment, not the model
    peak = results[0][1]["peak_sent_bytes"]
    assert peak == 4 * max(sum(sizes[i] for i in g) for g in groups) + 4 + 4


@pytest.mark.parametrize("world", [2, 4])
def test_sparseloco_agrees_with_reference(world):
    results = run_world(_world, world, "sparseloco", {})
    k = lambda v: _two_bit_topk(v, math.ceil(0.1 * v.numel()))  # noqa: E731
    expected = family_reference(world, k, _adamw, decay=0.95)
    _check(results, expected)
    without_decay = family_reference(world, k, _adamw)
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(expected[0], without_decay[0]))


@pytest.mark.parametrize(
    "kind, kw",
    [("qsparse", {"schedule": "staggered"}), ("diloco", {"fragments": 2, "delay": 1})],
    ids=["staggered", "streaming"],
)
def test_a_node_is_one_worker(kind, kw):
    results = run_world(_world, 4, kind, kw, 2)  # 2 nodes of 2 ranks
    if kind == "qsparse":
        expected = family_reference(2, lambda v: _signtopk(v, 10), _sgdm, schedule="staggered", node_size=2)
    else:
        groups = [[0], [1, 2, 3]]
        expected = family_reference(2, lambda v: v, _adamw, groups=groups, delay=1, outer=(0.7, 0.9), node_size=2)
    _check(results, [expected[0], expected[0], expected[1], expected[1]])


def test_fragments_are_consecutive_balanced_and_never_empty():
    assert fragments([10, 10, 10, 10], 2) == [[0, 1], [2, 3]]
    assert fragments([10, 10, 10, 10], 4) == [[0], [1], [2], [3]]
    assert fragments([100, 1, 1, 1], 3) == [[0], [1], [2, 3]]
    assert fragments([1, 1, 1, 100], 2) == [[0, 1, 2], [3]]
    for count in range(1, 6):
        groups = fragments([5, 7, 1, 9, 3], count)
        assert sum(groups, []) == list(range(5)) and all(groups)


# ---------------------------------------------------------------- resume, faults
CONFIGS = {
    "random": ("qsparse", {"schedule": "random"}),
    "staggered": ("qsparse", {"schedule": "staggered"}),
    "streaming-in-flight": ("diloco", {"fragments": 2, "delay": 1, "compressor": "topk-int8", "k": 0.2}),
    "sparseloco-streaming": ("sparseloco", {"fragments": 2, "delay": 2}),
}


def _setup(kind, kw):
    model = _Net()
    ddp = DDP(model, bucket_cap_mb=0.001)
    opt = _inner_of(kind)(ddp.parameters())
    return model, ddp, opt, _state(kind, **kw).register(ddp, opt)


def _steps(ddp, opt, data):
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()


def _resume_world(rank, world, kind, kw, cut):
    data = batches(rank, STEPS)
    model, ddp, opt, state = _setup(kind, kw)
    _steps(ddp, opt, data)
    straight = params_of(model)
    model, ddp, opt, state = _setup(kind, kw)
    _steps(ddp, opt, data[:cut])
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()})
    in_flight = len(saved["hook"]["extra"].get("in_flight", []))
    model, ddp, opt, state = _setup(kind, kw)
    refused = ""
    if in_flight:  # an exchange that does not fit this run is refused, naming it
        bad = copy.deepcopy(saved["hook"])
        bad["extra"]["in_flight"][0]["land"] = 10**6
        try:
            state.load_state_dict(bad)
        except ValueError as exc:
            refused = str(exc)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    state.load_state_dict(saved["hook"])
    _steps(ddp, opt, data[cut:])
    return straight, params_of(model), in_flight, refused


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resumes_bit_exactly_mid_schedule(name):
    kind, kw = CONFIGS[name]
    cut = 6  # streaming: fragment 1 launched after step 6, applied after step 7 or 8
    for straight, resumed, in_flight, refused in run_world(_resume_world, 2, kind, kw, cut):
        for a, b in zip(straight, resumed):
            assert torch.equal(a, b)
        assert in_flight == (1 if kw.get("delay") else 0)
        assert ("in_flight" in refused) == bool(in_flight), refused


def _nonfinite_world(rank, world, kind, kw, bad_step):
    """Rank 1's first tensor turns NaN in the optimizer step before it sends it (the step's
    gradients are finite, so nothing skips it): that exchange must move nothing."""
    model, ddp, opt, state = _setup(kind, kw)
    for t, (x, y) in enumerate(batches(rank, STEPS)):
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        if t == bad_step and rank == 1:
            with torch.no_grad():
                model.a.weight[0, 0] = float("nan")
        opt.step()
    memory = state.state_dict()["memory"]
    return params_of(model), [t for slot in memory.values() for t in slot.values()]


@pytest.mark.parametrize(
    "kind, kw, bad_step",
    [("qsparse", {"schedule": "staggered"}, 5), ("diloco", {"fragments": 2}, 3)],
    ids=["staggered", "streaming"],
)
def test_a_non_finite_exchange_moves_nothing(kind, kw, bad_step):
    for params, memory in run_world(_nonfinite_world, 2, kind, kw, bad_step):
        assert all(bool(torch.isfinite(p).all()) for p in params)  # rank 1 restarted from the master
        assert all(bool(torch.isfinite(m).all()) for m in memory)  # the memories kept their values


def test_bad_arguments_raise_value_error_naming_them():
    cases = [
        {"schedule": "later"},
        {"fragments": 0},
        {"fragments": 9, "period": 8},
        {"delay": 8, "period": 8},
        {"mix": 1.0},
        {"error_decay": 0.0},
        {"schedule": "random", "period": 1},
        {"schedule": "staggered", "fragments": 2},
        {"compressor": "grbs", "schedule": "random"},
    ]
    names = ["schedule", "fragments", "fragments", "delay", "mix", "error_decay", "schedule", "schedule", "grbs"]
    for message, name in zip(value_errors(dh.QsparseLocalSGD, cases), names):
        assert name in message, message
    for message, name in zip(value_errors(dh.SparseLoCo, [{"bits": 4}, {"period": 1}]), ["bits", "period"]):
        assert name in message, message


def _dead_peer_world(rank, world, kind, kw):
    model, ddp, opt, state = _setup(kind, kw)
    for t, (x, y) in enumerate(batches(rank, STEPS)):
        if rank == 1 and t == 5:
            os._exit(7)  # dies between its steps; the others are mid-schedule
        try:
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
        except Exception as exc:  # noqa: BLE001 - what the survivor saw is the result
            return t, f"{type(exc).__name__}: {exc}"
    return None, ""


@pytest.mark.parametrize("name", ["staggered", "streaming-in-flight"])
def test_a_dead_peer_fails_every_survivor(name):
    kind, kw = CONFIGS[name]
    results = run_world(_dead_peer_world, 3, kind, kw, may_die=(1,), timeout=120)
    for rank in (0, 2):
        failed_at, error = results[rank]
        assert failed_at == 5, results[rank]
        assert "ddp_hooks:" in error or "Connection closed" in error or "Timed out" in error, error


def _fsdp_world(rank, world, kind, kw):
    from test_fsdp import _mesh, _shard_one

    mesh = _mesh()
    model = _Net()
    for layer in (model.a, model.b):
        _shard_one(layer, mesh["shard"])
    _shard_one(model, mesh["shard"])
    opt = _inner_of(kind)(model.parameters())
    state = dh.QsparseLocalSGD("none", period=PERIOD, **kw) if kind == "qsparse" else _state(kind, **kw)
    state.register_fsdp(model, opt, mesh=mesh)
    for x, y in batches(rank, STEPS):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.full_tensor() for p in model.parameters()]


@pytest.mark.skipif(OLD_TORCH, reason=f"FSDP2's all-reduce hook needs torch 2.7, this is {torch.__version__}")
@pytest.mark.parametrize(
    "kind, kw",
    [("qsparse", {"schedule": "staggered"}), ("diloco", {"fragments": 2, "delay": 1})],
    ids=["staggered", "streaming"],
)
def test_the_replicas_of_a_sharded_model_are_the_workers(kind, kw):
    """2 replicas x 2 shards (FSDP2): a replica is one worker, fragments are cut from whole
    tensors although each rank holds shards of them."""
    results = run_world(_fsdp_world, 4, kind, kw)
    if kind == "qsparse":
        expected = family_reference(2, lambda v: v, _sgdm, schedule="staggered", node_size=2)
    else:
        groups = [[0], [1, 2, 3]]
        expected = family_reference(2, lambda v: v, _adamw, groups=groups, delay=1, outer=(0.7, 0.9), node_size=2)
    for rank, params in enumerate(results):
        for got, want in zip(params, expected[rank // 2]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
