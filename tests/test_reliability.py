"""Nothing silently wrong: ranks configured differently are caught, checkpoints that do not fit
change nothing, one state serves one model and one live process group, and every
constructor refuses bad arguments by name."""

import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_hooks as dh
from ddp_hooks import catalog
from ddp_hooks.testing import run_world

from models import value_errors


def _mlp(width=24):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, width), nn.Tanh(), nn.Linear(width, 5))


def _step(ddp, opt, rank, t=0):
    g = torch.Generator().manual_seed(100 * rank + t)
    opt.zero_grad()
    nn.functional.cross_entropy(ddp(torch.randn(8, 16, generator=g)), torch.randint(0, 5, (8,), generator=g)).backward()
    opt.step()


# ---------------------------------------------------------------- ranks that disagree
MISMATCHES = {
    "algorithm": (lambda: dh.FP16Compress(), lambda: dh.BF16Compress(), "algorithm"),
    "hyper-parameter": (lambda: dh.PowerSGD(rank=2), lambda: dh.PowerSGD(rank=4), "rank"),
    "warm-up": (lambda: dh.EFSignSGDM(warmup_steps=0), lambda: dh.EFSignSGDM(warmup_steps=5), "warmup_steps"),
    "wire": (lambda: dh.LAQ(wire="uploads"), lambda: dh.LAQ(wire="dense"), "wire"),
    "topology": (lambda: dh.EFSignSGDM(), lambda: dh.EFSignSGDM(topology="allgather"), "topology"),
}


def _mismatch_world(rank, world, case, direct):
    first, second, _ = MISMATCHES[case]
    state = first() if rank == 0 else second()
    ddp = DDP(_mlp())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    try:
        if direct:  # torch's style: the check runs at the first hook call, inside backward
            ddp.register_comm_hook(state, dh.comm_hook)
        else:
            state.register(ddp, opt)
        _step(ddp, opt, rank)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_ranks_configured_differently_raise_on_every_rank(case):
    field = MISMATCHES[case][2]
    for message in run_world(_mismatch_world, 2, case, False, timeout=60):
        assert message is not None and "ConfigMismatch" in message, message
        assert f"{field}:" in message and "rank 0" in message and "rank 1" in message, message


def test_mismatch_is_caught_at_the_first_hook_call_when_registered_the_torch_way():
    for message in run_world(_mismatch_world, 2, "hyper-parameter", True, timeout=60):
        assert message is not None and "rank:" in message and "rank 1 4" in message, message


class _Named(nn.Module):
    """The same shapes as ``_mlp()`` under other names (DDP compares shapes only)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 24), nn.Linear(24, 5)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _layout_world(rank, world):
    ddp = DDP(_mlp() if rank == 0 else _Named())
    try:
        dh.PowerSGD().register(ddp)
    except dh.ConfigMismatch as exc:
        return str(exc)
    return None


def test_models_with_another_parameter_layout_are_caught_at_registration():
    for message in run_world(_layout_world, 2, timeout=60):
        assert message is not None and "parameters:" in message, message


# ---------------------------------------------------------------- checkpoints all-or-nothing
def _corruptions(saved):
    param, shape = next(iter(saved["layout"].items()))
    out = {
        "missing memory": {k: v for k, v in saved.items() if k != "memory"},
        "garbage extra": {**saved, "extra": "garbage"},
        "garbage stats": {**saved, "stats": {"total": {"wire_bytes": "lots"}}},
        "unknown slot": _with_memory(saved, "no_such_slot", param, torch.zeros(shape).reshape(-1)),
        "negative step": {**saved, "step": -3},
    }
    out["unknown extra key"] = {**saved, "extra": {**saved["extra"], "surprise": 1}}
    for key in saved["extra"]:
        out[f"extra without {key}"] = {**saved, "extra": {k: v for k, v in saved["extra"].items() if k != key}}
    for slot, tensors in saved["memory"].items():  # every slot the algorithm keeps
        param, tensor = next(iter(tensors.items()))
        lost = copy.deepcopy(saved)
        del lost["memory"][slot][param]
        out[f"{slot}: an entry lost"] = lost
        out[f"{slot}: wrong size"] = _with_memory(saved, slot, param, torch.zeros(tensor.numel() + 1))
        out[f"{slot}: NaN"] = _with_memory(saved, slot, param, torch.full_like(tensor, float("nan")))
        out[f"{slot}: float64"] = _with_memory(saved, slot, param, tensor.double())
    return out


def _with_memory(saved, slot, param, value):
    bad = copy.deepcopy(saved)
    bad["memory"].setdefault(slot, {})[param] = value
    return bad


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


def _checkpoint_world(rank, world, name):
    ddp = DDP(_mlp())
    setup = catalog.build(name, ddp, 0.05)
    for t in range(3):
        _step(ddp, setup.optimizer, rank, t)
    saved = copy.deepcopy(setup.state.state_dict())
    for t in range(3, 5):  # the state moves on: a half-load would show
        _step(ddp, setup.optimizer, rank, t)
    before = copy.deepcopy(setup.state.state_dict())
    outcomes = {}
    for label, bad in _corruptions(saved).items():
        try:
            setup.state.load_state_dict(bad)
            outcomes[label] = "accepted"
        except ValueError as exc:
            outcomes[label] = str(exc) if _same(setup.state.state_dict(), before) else "changed before raising"
    return outcomes


@pytest.mark.parametrize("name", ["ef-sgdm", "powersgd", "cser", "qsparse", "laq"])
def test_corrupt_checkpoints_raise_before_anything_is_assigned(name):
    outcomes = run_world(_checkpoint_world, 2, name, timeout=60)[0]
    for label, message in outcomes.items():
        assert message not in ("accepted", "changed before raising"), (label, message)
        assert message.startswith("cannot load"), (label, message)
        if label.endswith("an entry lost"):
            assert "missing entries" in message, message
        if label == "unknown extra key":
            assert "'surprise'" in message, message


def _config_world(rank, world, case):
    states = []
    for make in CONFIGS[case][:2]:
        ddp = DDP(_mlp())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        state = make().register(ddp, opt)
        _step(ddp, opt, rank)
        states.append(state)
    before = copy.deepcopy(states[1].state_dict())
    try:
        states[1].load_state_dict(states[0].state_dict())
    except ValueError as exc:
        return str(exc), _same(states[1].state_dict(), before)
    return None, False


CONFIGS = {
    "powersgd rank": (lambda: dh.PowerSGD(rank=2), lambda: dh.PowerSGD(rank=4), "rank"),
    "qsparse period": (lambda: dh.QsparseLocalSGD(period=1), lambda: dh.QsparseLocalSGD(period=4), "period"),
    "laq wire": (lambda: dh.LAQ(wire="dense"), lambda: dh.LAQ(wire="uploads"), "wire"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_state_saved_with_another_configuration_is_refused(case):
    field = CONFIGS[case][2]
    message, unchanged = run_world(_config_world, 2, case, timeout=60)[0]
    assert message is not None and f"{field}: saved" in message, message
    assert unchanged


# ---------------------------------------------------------------- one model, one live group
def _two_models_world(rank, world):
    state = dh.PowerSGD(rank=2)
    first, second = DDP(_mlp()), DDP(_mlp())
    state.register(first)
    messages = value_errors(lambda: state.register(second), [{}])
    # torch's style: the second model's backward is refused at its first bucket after step 0
    other = dh.FP16Compress()
    a, b = DDP(_mlp()), DDP(_mlp())
    a.register_comm_hook(other, dh.comm_hook)
    b.register_comm_hook(other, dh.comm_hook)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    _step(a, opt_a, rank)
    try:
        _step(b, opt_b, rank)
    except RuntimeError as exc:
        messages.append(str(exc))
    return messages


def test_a_state_refuses_a_second_model():
    messages = run_world(_two_models_world, 2, timeout=60)[0]
    assert len(messages) == 2
    assert "another model" in messages[0] and "another model" in messages[1]


def _destroyed_world(rank, world):
    state = dh.FP16Compress()
    ddp = DDP(_mlp())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    state.register(ddp, opt)
    _step(ddp, opt, rank)
    store = dist.distributed_c10d._get_default_store()
    dist.destroy_process_group()
    dist.init_process_group("gloo", store=dist.PrefixStore("again", store), rank=rank, world_size=world)
    ddp2 = DDP(_mlp())
    ddp2.register_comm_hook(state, dh.comm_hook)  # the old state, a new group
    try:
        _step(ddp2, torch.optim.SGD(ddp2.parameters(), lr=0.1), rank)
    except RuntimeError as exc:
        return str(exc)
    return None


def test_a_state_refuses_to_run_on_a_destroyed_process_group():
    for message in run_world(_destroyed_world, 2, timeout=60):
        assert message is not None and "destroyed" in message, message


# ---------------------------------------------------------------- arguments
CONSTRUCTORS = {
    "AllReduce": dh.AllReduce,
    "FP16Compress": dh.FP16Compress,
    "EFSignSGDM": dh.EFSignSGDM,
    "PowerSGD": dh.PowerSGD,
    "CSER": dh.CSER,
    "QsparseLocalSGD": dh.QsparseLocalSGD,
    "LAQ": dh.LAQ,
}
BAD = {
    "AllReduce": [("warmup_steps", 10**30), ("warmup_steps", "3")],
    "FP16Compress": [("warmup_steps", -1)],
    "EFSignSGDM": [
        ("nesterov", "False"),
        ("nesterov", 1),
        ("block_size", 10**30),
        ("topology", ["sharded"]),
        ("momentum", float("nan")),
        ("momentum", True),
    ],
    "PowerSGD": [
        ("warm_start", [1]),
        ("error_feedback", None),
        ("seed", 2**64),
        ("seed", 2**64 - 1),
        ("seed", -1),
        ("rank", 10**30),
        ("orthogonalization", ["qr"]),
        ("epsilon", float("inf")),
    ],
    "CSER": [
        ("seed", 2**63),
        ("block_size", 10**30),
        ("period", 10**30),
        ("model_compressor", {"grbs"}),
        ("grad_ratio", float("nan")),
    ],
    "QsparseLocalSGD": [
        ("wipe_memory_on_lr_change", "abc"),
        ("seed", 2**64),
        ("compressor", ["topk"]),
        ("k", float("nan")),
        ("levels", 10**30),
    ],
    "LAQ": [
        ("quantize", float("nan")),
        ("skip", "no"),
        ("max_staleness", 10**30),
        ("memory_depth", 10**30),
        ("wire", ("uploads",)),
        ("xi", float("nan")),
    ],
}


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_every_constructor_refuses_bad_arguments_by_name(name):
    for argument, value in BAD[name]:
        with pytest.raises(ValueError) as info:
            CONSTRUCTORS[name](**{argument: value})
        message = str(info.value)
        assert message.startswith(argument) and " must be " in message, (argument, value, message)
        assert math.isfinite(len(message))
