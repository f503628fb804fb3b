"""The models people have: fp64, channels_last and sparse-gradient models, and the inputs a
launcher that started one process hands over. Each trains correctly or is refused at
``register()`` with a ValueError naming the problem (never a crash deep inside a hook)."""

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_hooks as dh
from ddp_hooks import catalog
from ddp_hooks.testing import run_world


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3)
        self.c2 = nn.Conv2d(8, 6, 3)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def _data(rank, steps=6):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(steps)]


def _formats_world(rank, world, fmt):
    """Every code path of the catalog on the same conv model and data, as ``fmt`` lays it out."""
    out = {}
    for name, entry in catalog.PATHS.items():
        model, data = _Conv(), _data(rank)
        if fmt == "float64":
            model, data = model.double(), [(x.double(), y) for x, y in data]
        elif fmt == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            data = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in data]
            assert model.c1.weight.is_contiguous(memory_format=torch.channels_last)
        ddp = DDP(model)
        setup = entry.build(ddp, 0.05)
        for x, y in data:
            setup.optimizer.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            setup.optimizer.step()
        assert setup.state.step == len(data)
        out[name] = [p.detach().double().clone() for p in model.parameters()]
    return out


@pytest.fixture(scope="module")
def contiguous_fp32():
    return run_world(_formats_world, 2, "contiguous")


# quantizers to levels (stochastic rounding, and int8's rounding to the nearest): an fp64
# rounding difference can move one value to the next level
ROUNDS_TO_LEVELS = ("qsparse-qsgd", "qsparse-qtopk", "diloco-streaming")


@pytest.mark.parametrize("fmt", ["channels_last", "float64"])
def test_every_algorithm_gives_the_contiguous_fp32_result(fmt, contiguous_fp32):
    """The same result to float rounding: channels_last gradients reach the algorithms in
    logical order (PowerSGD's matrices, CSER's blocks, block_size blocks mean the same), and an
    fp64 model is compressed in fp32 like a 16-bit one."""
    got = run_world(_formats_world, 2, fmt)
    for rank in range(2):
        for name in catalog.PATHS:
            atol = 1e-3 if fmt == "float64" and name in ROUNDS_TO_LEVELS else 2e-6
            for a, b in zip(got[rank][name], contiguous_fp32[rank][name]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
            assert all(torch.isfinite(p).all() for p in got[rank][name]), name


class _Embedding(nn.Module):
    def __init__(self, sparse=True):
        super().__init__()
        torch.manual_seed(0)
        self.tokens = nn.Embedding(20, 8, sparse=sparse)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.tokens(x).mean(1))


class _Complex(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.phase = nn.Parameter(torch.zeros(4, dtype=torch.complex64))

    def forward(self, x):
        return self.fc(x) + self.phase.real


def _refusals_world(rank, world):
    out = {}
    for name, entry in catalog.ENTRIES.items():
        try:
            entry.build(DDP(_Embedding()), 0.05)
            out[name] = None
        except ValueError as exc:
            out[name] = str(exc)
    # AllReduce reduces sparse gradients as DDP does: the same model as DDP without a hook
    results = []
    for hooked in (False, True):
        model = _Embedding()
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        if hooked:
            dh.AllReduce().register(ddp, opt)
        g = torch.Generator().manual_seed(rank)
        for _ in range(3):
            opt.zero_grad()
            x, y = torch.randint(0, 20, (4, 5), generator=g), torch.randint(0, 4, (4,), generator=g)
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    out["allreduce_sparse_equal"] = all(torch.equal(a, b) for a, b in zip(*results))
    return out


def test_sparse_gradients_are_refused_at_register():
    out = run_world(_refusals_world, 2)[0]
    for name in catalog.ENTRIES:
        if name == "fp32":
            assert out[name] is None
        else:
            assert out[name] is not None and "'tokens.weight'" in out[name] and "sparse" in out[name], name
    assert out["allreduce_sparse_equal"]


@pytest.mark.parametrize("name", list(catalog.ENTRIES))
def test_unsupported_dtypes_are_refused_when_the_model_is_attached(name):
    """(DDP itself cannot broadcast a complex model over gloo before torch 2.5, so the model
    is attached directly, as register() does first.)"""
    with pytest.raises(ValueError, match="'phase' is torch.complex64"):
        catalog.ENTRIES[name].state().attach(_Complex())


def test_a_model_that_is_not_ddp_is_refused_with_the_likely_cause():
    with pytest.raises(ValueError, match="not DistributedDataParallel.*one process"):
        dh.EFSignSGDM().register(nn.Linear(3, 2))


def test_no_process_group_says_so():
    state = dh.PowerSGD(rank=2).attach(nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match="init_process_group.*one process"):
        state.state_dict()
