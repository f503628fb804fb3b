"""Every hook's checkpoint holds everything: a save / fresh-start / load round trip gives back
the same state, and training resumes exactly where the algorithm's math does not depend on
DDP's bucket layout."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_hooks import catalog
from ddp_hooks.testing import run_world

from models import batches, params_of

# bit-exact on every world size: what the algorithm sums, it sums itself in rank order (or
# nothing); the others sum inside gloo's all-reduce, whose rounding with more than 2 ranks
# depends on where a value sits in its bucket, and a restarted DDP buckets its first step by
# its initial layout (it rebuilds the buckets after that step)
EXACT_ON_ANY_WORLD = ["ef-sgdm", "qsparse", "laq"]


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 48)
        self.b = nn.Linear(48, 48)
        self.c = nn.Linear(48, 5)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _setup(name, node_size=None):
    model = _Net()
    ddp = DDP(model, bucket_cap_mb=0.005)
    return model, ddp, catalog.build(name, ddp, 0.05, node_size=node_size)


def _train(ddp, setup, data):
    for x, y in data:
        setup.optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        setup.optimizer.step()


def _save(model, setup):
    return {
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(setup.optimizer.state_dict()),
        "hook": copy.deepcopy(setup.state.state_dict()),
    }


def _load(model, setup, saved):
    model.load_state_dict(saved["model"])
    setup.optimizer.load_state_dict(saved["optimizer"])
    setup.state.load_state_dict(saved["hook"])


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


def _world(rank, world, name, split, total, node_size=None):
    data = batches(rank, total, features=16)
    model, ddp, setup = _setup(name, node_size)
    _train(ddp, setup, data[:split])
    saved = _save(model, setup)
    _train(ddp, setup, data[split:])
    straight = params_of(model)

    model2, ddp2, setup2 = _setup(name, node_size)
    _load(model2, setup2, saved)
    round_trip = _same(_save(model2, setup2), saved)
    _train(ddp2, setup2, data[split:])
    return straight, params_of(model2), round_trip


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(catalog.ENTRIES))
def test_checkpoint_round_trip_and_resume(name, world):
    for straight, resumed, round_trip in run_world(_world, world, name, 5, 9):
        assert round_trip, "what was loaded must save back identically"
        if world == 2 or name in EXACT_ON_ANY_WORLD:
            assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
        else:
            for a, b in zip(straight, resumed):
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # a 16-bit ulp at most


def _apart_world(rank, world, older_rank):
    """Every rank resumes, but ``older_rank`` from an earlier checkpoint (its latest write
    died); for every hook, the message each rank raised (None: it trained on)."""
    out = {}
    for name in catalog.ENTRIES:
        data = batches(rank, 8, features=16)
        model, ddp, setup = _setup(name)
        _train(ddp, setup, data[:4])
        early = _save(model, setup)
        _train(ddp, setup, data[4:6])
        late = _save(model, setup)
        model2, ddp2, setup2 = _setup(name)
        _load(model2, setup2, early if rank == older_rank else late)
        try:
            _train(ddp2, setup2, data[6:])
            out[name] = None
        except ValueError as exc:
            out[name] = str(exc)
    return out


def test_ranks_resumed_from_different_steps_are_stopped_at_the_first_hook():
    for messages in run_world(_apart_world, 2, 1, timeout=120):
        for name, message in messages.items():
            assert message is not None, (name, "the ranks trained on from different steps")
            assert "resumed" in message and "rank 0 6" in message and "rank 1 4" in message, (name, message)


def _format2_world(rank, world, name):
    data = batches(rank, 6, features=16)
    model, ddp, setup = _setup(name)
    _train(ddp, setup, data[:3])
    saved = _save(model, setup)
    _train(ddp, setup, data[3:])
    straight = params_of(model)
    old = {k: v for k, v in saved["hook"].items() if k != "manifest"}
    old["format"] = 2  # as the previous version wrote it: no manifest
    model2, ddp2, setup2 = _setup(name)
    _load(model2, setup2, {**saved, "hook": old})
    _train(ddp2, setup2, data[3:])
    return all(torch.equal(a, b) for a, b in zip(straight, params_of(model2)))


def test_a_checkpoint_of_the_previous_format_still_resumes_exactly():
    assert all(run_world(_format2_world, 2, "ef-sgdm"))


def _get_state_dict_world(rank, world, name):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, ddp, setup = _setup(name)
    _train(ddp, setup, batches(rank, 3, features=16))
    setup.optimizer.zero_grad(set_to_none=True)
    before = copy.deepcopy(setup.state.state_dict())
    get_state_dict(ddp, setup.optimizer)  # creates the optimizer's state with a step at lr 0
    return _same(before, setup.state.state_dict())


@pytest.mark.parametrize("name", ["ef-sgdm", "laq"])  # plain SGD: no optimizer state yet
def test_torch_checkpoint_state_dict_step_is_not_the_algorithms(name):
    """torch.distributed.checkpoint's get_state_dict steps an optimizer without state once
    (zero gradients, learning rate 0): the hook state must not count it as a training step."""
    assert all(run_world(_get_state_dict_world, 2, name))


def _problems_world(rank, world):
    import ddp_hooks as dh

    data = batches(rank, 2, features=16)
    model, ddp, setup = _setup("powersgd")
    _train(ddp, setup, data)
    saved = setup.state.state_dict()
    other = dh.PowerSGD(rank=setup.state.settings.rank + 1).register(DDP(_Net()))
    torch.distributed.barrier()  # no rank leaves while another still connects the new groups
    return setup.state.problems(saved), other.problems(saved), setup.state.problems({**saved, "format": 1})


def test_problems_says_before_loading_what_keeps_a_checkpoint_out():
    for fits, other_rank, old_format in run_world(_problems_world, 2):
        assert fits == []
        assert any(p.startswith("rank: saved") for p in other_rank), other_rank
        assert old_format == ["format 1; this version reads formats [2, 3]"]
