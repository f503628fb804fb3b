"""The hooks by name, with the settings the demo and the benchmarks run them at.

Each entry builds, for a DDP model and a learning rate, the optimizer to step and the state
whose ``stats()`` to read. Algorithms that apply momentum inside the hook get a plain SGD
optimizer, LAQ too (its rule assumes plain gradient steps); the others get SGD with momentum
0.9.
"""

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from . import algorithms as alg
from .core import HookState


@dataclass
class Setup:
    """What a training loop needs from an entry: the optimizer to step and the state."""

    optimizer: torch.optim.Optimizer
    state: HookState
    evaluation: Callable[[], object] = field(default=nullcontext)


@dataclass(frozen=True)
class Entry:
    name: str
    summary: str
    build: Callable[[torch.nn.Module, float], Setup]


def _sgdm(ddp, lr):
    return torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9)


def _sgd(ddp, lr):
    return torch.optim.SGD(ddp.parameters(), lr=lr)


def _ef_sgdm(ddp, lr):
    opt = _sgd(ddp, lr)  # momentum lives in the hook
    return Setup(opt, alg.EFSignSGDM(momentum=0.9).register(ddp, opt))


def _cser(ddp, lr):
    opt = _sgdm(ddp, lr)
    state = alg.CSER(grad_ratio=64, model_ratio=4, period=16).register(ddp, opt)
    return Setup(opt, state, state.averaged)


def _qsparse(ddp, lr):
    opt = _sgdm(ddp, lr)
    return Setup(opt, alg.QsparseLocalSGD("signtopk", k=0.01, period=4).register(ddp, opt))


def _laq(ddp, lr):
    # minibatch gradients: SLAQ's threshold; plain SGD as in the paper (stale gradients and
    # momentum do not mix well)
    opt = _sgd(ddp, 2 * lr)
    return Setup(opt, alg.LAQ.slaq(bits=4).register(ddp, opt))


def _simple(state_cls, **kwargs):
    def build(ddp, lr):
        return Setup(_sgdm(ddp, lr), state_cls(**kwargs).register(ddp))

    return build


ENTRIES: dict[str, Entry] = {
    e.name: e
    for e in [
        Entry("fp32", "exact fp32 all-reduce (DDP's default)", _simple(alg.AllReduce)),
        Entry("fp16", "fp16 all-reduce", _simple(alg.FP16Compress)),
        Entry("bf16", "bf16 all-reduce", _simple(alg.BF16Compress)),
        Entry("ef-sgdm", "dist-EF-SGDM: 1-bit scaled sign both ways, sharded", _ef_sgdm),
        Entry("cser", "CSER: GRBS 1/64 gradient sync + 1/4 error reset every 16 steps (RC 32)", _cser),
        Entry("qsparse", "Qsparse-local-SGD: SignTopK 1% per tensor, sync every 4 steps", _qsparse),
        Entry("laq", "SLAQ: 4-bit innovations, uploads skipped while small", _laq),
        Entry("powersgd", "PowerSGD rank 4, warm start, error feedback", _simple(alg.PowerSGD, rank=4)),
    ]
}


def build(name: str, ddp: torch.nn.Module, lr: float) -> Setup:
    """Build entry ``name`` on ``ddp``; raises ValueError for an unknown name."""
    if name not in ENTRIES:
        raise ValueError(f"hook must be one of {sorted(ENTRIES)}, got {name!r}")
    return ENTRIES[name].build(ddp, lr)
