"""Every algorithm in the DDP modes users turn on: torch.compile (DDPOptimizer) equal to eager,
python_reducer refused clearly, no_sync gradient accumulation, find_unused_parameters,
static_graph, gradient_as_bucket_view, tied and frozen parameters, GradScaler with an inf on
one rank, and replicated algorithms bit-identical across ranks with torch's default threads."""

import math

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_hooks import catalog
from ddp_hooks.testing import run_world

HOOKS = ["fp16", "ef-sgdm", "powersgd", "cser", "qsparse", "laq"]
REPLICATED = ["fp16", "bf16", "ef-sgdm", "powersgd", "laq"]


def _mlp(width=32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 5))


def _data(rank, steps, batch=8):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(batch, 16, generator=g), torch.randint(0, 5, (batch,), generator=g)) for _ in range(steps)]


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------- torch.compile
def _compile_world(rank, world, name, compiled):
    model = nn.Sequential(nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 5))
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.05)
    ddp = DDP(model, bucket_cap_mb=1.5)  # several buckets: DDPOptimizer splits the graph
    setup = catalog.build(name, ddp, 0.05)
    run = torch.compile(ddp) if compiled else ddp
    for x, y in _data(rank, 6):
        setup.optimizer.zero_grad()
        nn.functional.cross_entropy(run(x), y).backward()
        setup.optimizer.step()
    return _params(model), setup.state.step


@pytest.mark.parametrize("name", HOOKS)
def test_torch_compile_default_equals_eager(name):
    eager = run_world(_compile_world, 2, name, False)
    compiled = run_world(_compile_world, 2, name, True)
    for e, c in zip(eager, compiled):
        assert c[1] == 6
        assert all(torch.equal(a, b) for a, b in zip(e[0], c[0]))


def _python_reducer_world(rank, world):
    import torch._dynamo

    import ddp_hooks as dh

    torch._dynamo.config.optimize_ddp = "python_reducer"
    ddp = DDP(_mlp())
    try:
        dh.PowerSGD().register(ddp)
    except ValueError as exc:
        return str(exc)
    return None


def test_python_reducer_is_refused_at_registration_naming_the_alternative():
    msg = run_world(_python_reducer_world, 1)[0]
    assert msg is not None and "python_reducer" in msg and "DDPOptimizer" in msg


# ---------------------------------------------------------------- no_sync accumulation
def _accumulation_world(rank, world, name, no_sync):
    model = _mlp()
    ddp = DDP(model)
    setup = catalog.build(name, ddp, 0.05)
    data = _data(rank, 16)
    for (x1, y1), (x2, y2) in zip(data[::2], data[1::2]):
        setup.optimizer.zero_grad()
        if no_sync:
            with ddp.no_sync():
                nn.functional.cross_entropy(ddp(x1), y1).backward()
            nn.functional.cross_entropy(ddp(x2), y2).backward()
        else:
            loss = nn.functional.cross_entropy(model(x1), y1) + nn.functional.cross_entropy(ddp(x2), y2)
            loss.backward()
        setup.optimizer.step()
    return _params(model), setup.state.step


@pytest.mark.parametrize("name", HOOKS)
def test_no_sync_accumulation_reduces_the_summed_gradient_once_per_step(name):
    accumulated = run_world(_accumulation_world, 2, name, True)
    summed = run_world(_accumulation_world, 2, name, False)
    for a, s in zip(accumulated, summed):
        assert a[1] == s[1] == 8
        for pa, ps in zip(a[0], s[0]):
            torch.testing.assert_close(pa, ps, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- DDP options
class _Branchy(nn.Module):
    """Tied input/output weights, a frozen layer, and a branch used only on even steps."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(16, 32, bias=False)
        self.frozen = nn.Linear(32, 32)
        self.frozen.requires_grad_(False)
        self.hidden = nn.Linear(32, 32)
        self.sometimes = nn.Linear(32, 32)
        self.head = nn.Linear(32, 16, bias=False)
        self.head.weight = nn.Parameter(self.embed.weight.t().contiguous())
        self.out = nn.Linear(16, 5)

    def forward(self, x, use_branch=True):
        h = torch.relu(self.frozen(self.embed(x)))
        h = torch.relu(self.hidden(h))
        if use_branch:
            h = h + torch.relu(self.sometimes(h))
        return self.out(self.head(h))


def _options_world(rank, world, name, options):
    model = _Branchy()
    frozen = _params(model.frozen)
    ddp = DDP(model, **options)
    setup = catalog.build(name, ddp, 0.05)
    unused = options.get("find_unused_parameters", False)
    for t, (x, y) in enumerate(_data(rank, 8)):
        setup.optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(x, use_branch=not unused or t % 2 == 0), y).backward()
        setup.optimizer.step()
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return _params(model), frozen, _params(model.frozen), finite, setup.state.step


OPTIONS = {
    "default": {},
    "gradient_as_bucket_view": {"gradient_as_bucket_view": True},
    "static_graph": {"static_graph": True},
    "find_unused_parameters": {"find_unused_parameters": True},
}


def _all_options_world(rank, world, name):
    return {key: _options_world(rank, world, name, options) for key, options in OPTIONS.items()}


@pytest.mark.parametrize("name", HOOKS)
def test_ddp_options_tied_and_frozen_parameters(name):
    per_rank = run_world(_all_options_world, 2, name)
    results = {key: [r[key] for r in per_rank] for key in OPTIONS}
    for key, ranks in results.items():
        for _params, frozen_before, frozen_after, finite, steps in ranks:
            assert finite and steps == 8, key
            assert all(torch.equal(a, b) for a, b in zip(frozen_before, frozen_after)), key
        if name in REPLICATED:
            assert all(torch.equal(a, b) for a, b in zip(ranks[0][0], ranks[1][0])), key
    # buckets as views and a static graph change nothing in the math
    for key in ("gradient_as_bucket_view", "static_graph"):
        for a, b in zip(results["default"][0][0], results[key][0][0]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- GradScaler
def _scaler_world(rank, world, name, bad_step):
    model = _mlp()
    ddp = DDP(model, bucket_cap_mb=0.001)
    setup = catalog.build(name, ddp, 0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    scales = []
    for t, (x, y) in enumerate(_data(rank, 10)):
        if t == bad_step and rank == 1:
            x = x.clone()
            x[0, 0] = float("inf")
        setup.optimizer.zero_grad()
        scaler.scale(nn.functional.cross_entropy(ddp(x), y)).backward()
        scaler.step(setup.optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    memory = setup.state.state_dict()["memory"]
    finite_memory = all(bool(torch.isfinite(t).all()) for slot in memory.values() for t in slot.values())
    return scales, _params(model), finite_memory, setup.state.local_steps if hasattr(setup.state, "local_steps") else 0


@pytest.mark.parametrize("name", HOOKS)
def test_grad_scaler_skips_the_same_steps_on_every_rank(name):
    results = run_world(_scaler_world, 2, name, 4, timeout=120)
    scales = [r[0] for r in results]
    assert scales[0] == scales[1], "every rank skips the same steps"
    assert scales[0][4] == scales[0][3] / 2, "the step with an inf on rank 1 is skipped (scale backs off)"
    assert scales[0].count(scales[0][0]) == 4 and len(set(scales[0])) == 2, "and only that one"
    for _, params, finite_memory, _local_steps in results:
        assert finite_memory
        assert all(bool(torch.isfinite(p).all()) for p in params)
    assert results[0][3] == results[1][3], "local step counts stay together"
    if name in REPLICATED or name == "qsparse":  # qsparse: 9 optimizer steps, synced at 4 and 8
        same = all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
        assert same == (name != "qsparse"), name


# ---------------------------------------------------------------- determinism
def _threads_world(rank, world, name, steps):
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=1 / math.sqrt(p.shape[-1]))
    ddp = DDP(model, bucket_cap_mb=0.1)
    setup = catalog.build(name, ddp, 0.02)
    g = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        setup.optimizer.zero_grad()
        x = torch.randn(32, 64, generator=g)
        nn.functional.cross_entropy(ddp(x), torch.randint(0, 10, (32,), generator=g)).backward()
        setup.optimizer.step()
    return _params(model), torch.get_num_threads()


@pytest.mark.parametrize("name", REPLICATED)
def test_replicated_algorithms_stay_bit_identical_for_100_steps_with_default_threads(name):
    results = run_world(_threads_world, 2, name, 100, threads=None, timeout=300)
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))
