"""The algorithms of this library: the classes ``ddp_hooks`` exports, and the hooks by name with
the settings the demo, the benchmarks and the client tests run them at.

Each entry says how to build its state (before or after the process group exists) and the
optimizer it is meant to run with: algorithms that apply momentum inside the hook get plain
SGD, LAQ too (its rule assumes plain gradient steps); the others get SGD with momentum 0.9.
A new algorithm is imported and listed here (and in ``__all__``), and nowhere else.
"""

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from .algorithms.baselines import AllReduce, BF16Compress, FP16Compress
from .algorithms.cser import CSER, CSERSettings
from .algorithms.diloco import DiLoCo, DiLoCoSettings, SparseLoCo, SparseLoCoSettings
from .algorithms.ef_signsgdm import EFSignSGDM, EFSignSGDMSettings
from .algorithms.laq import LAQ
from .algorithms.laq_state import LAQSettings
from .algorithms.local_settings import QsparseSettings
from .algorithms.powersgd import PowerSGD, PowerSGDSettings
from .algorithms.qsparse import QsparseLocalSGD
from .core import HookState

__all__ = [
    "CSER",
    "LAQ",
    "AllReduce",
    "BF16Compress",
    "DiLoCo",
    "EFSignSGDM",
    "FP16Compress",
    "PowerSGD",
    "QsparseLocalSGD",
    "SparseLoCo",
    # each algorithm's hyper-parameters (``state.settings``, ``Class.from_settings``)
    "CSERSettings",
    "DiLoCoSettings",
    "EFSignSGDMSettings",
    "LAQSettings",
    "PowerSGDSettings",
    "QsparseSettings",
    "SparseLoCoSettings",
]


@dataclass
class Setup:
    """What a training loop needs from an entry: the optimizer to step and the state."""

    optimizer: torch.optim.Optimizer
    state: HookState
    evaluation: Callable[[], Any] = field(default=nullcontext)


def _sgdm(params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def _sgd(params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr)


def _adamw(params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr)


@dataclass(frozen=True)
class Entry:
    name: str
    summary: str
    state: Callable[..., HookState]  # keyword options of every state: node_size, process_group
    optimizer: Callable[[Iterable[torch.Tensor], float], torch.optim.Optimizer] = _sgdm
    lr_scale: float = 1.0

    def build(self, ddp: torch.nn.Module, lr: float, **options: Any) -> Setup:
        """The state registered on ``ddp`` with its optimizer at ``lr`` (times ``lr_scale``);
        ``options`` go to the state (e.g. ``node_size=8``)."""
        opt = self.optimizer(ddp.parameters(), lr * self.lr_scale)
        state = self.state(**options).register(ddp, opt)
        evaluation = getattr(state, "averaged", nullcontext)
        return Setup(opt, state, evaluation)


ENTRIES: dict[str, Entry] = {
    e.name: e
    for e in [
        Entry("fp32", "exact fp32 all-reduce (DDP's default)", AllReduce),
        Entry("fp16", "fp16 all-reduce", FP16Compress),
        Entry("bf16", "bf16 all-reduce", BF16Compress),
        Entry(
            "ef-sgdm",
            "dist-EF-SGDM: 1-bit scaled sign both ways, sharded",
            lambda **kw: EFSignSGDM(momentum=0.9, **kw),
            _sgd,
        ),
        Entry(
            "cser",
            "CSER: GRBS 1/64 gradient sync + 1/4 error reset every 16 steps (RC 32)",
            lambda **kw: CSER(grad_ratio=64, model_ratio=4, period=16, **kw),
        ),
        Entry(
            "qsparse",
            "Qsparse-local-SGD: SignTopK 1% per tensor, sync every 4 steps",
            lambda **kw: QsparseLocalSGD("signtopk", k=0.01, period=4, **kw),
        ),
        # LAQ's defaults are for minibatch gradients: SLAQ's threshold, and an upload forced
        # after 10 silent rounds; plain SGD as in the paper (stale gradients and momentum do not
        # mix well), at twice the learning rate
        Entry(
            "laq",
            "SLAQ: 4-bit innovations, uploads skipped while small (at most 10 rounds)",
            lambda **kw: LAQ(bits=4, **kw),
            _sgd,
            lr_scale=2.0,
        ),
        Entry("powersgd", "PowerSGD rank 4, warm start, error feedback", lambda **kw: PowerSGD(rank=4, **kw)),
        # DiLoCo's inner optimizer is AdamW (at 1/50 of the SGD learning rate); every 8 steps
        # at these small scales, where the paper's outer momentum 0.9 (an outer step of about
        # 7x the mean progress, meant for H = 500) overshoots: 0.5
        Entry(
            "diloco",
            "DiLoCo: 8 inner AdamW steps, outer Nesterov step (0.7, 0.5) on fp32 pseudo-gradients",
            lambda **kw: DiLoCo(period=8, outer_momentum=0.5, **kw),
            _adamw,
            lr_scale=0.02,
        ),
        Entry(
            "sparseloco",
            "SparseLoCo: 8 inner AdamW steps, 2-bit top-5% pseudo-gradients with decaying error feedback",
            lambda **kw: SparseLoCo(period=8, k=0.05, **kw),
            _adamw,
            lr_scale=0.02,
        ),
    ]
}


def _qsparse(kind: str) -> Callable[..., HookState]:
    return lambda **kw: QsparseLocalSGD(kind, k=0.1, period=2, **kw)


# one state per code path, with periods short enough that a few steps run every branch (the
# synchronizations and resets of the local-step algorithms included): what the host-read test
# and the GPU check (benchmarks/sync_check.py) exercise
PATHS: dict[str, Entry] = {
    e.name: e
    for e in [
        ENTRIES["fp32"],
        ENTRIES["fp16"],
        ENTRIES["bf16"],
        ENTRIES["ef-sgdm"],
        Entry(
            "ef-sgdm-allgather",
            "dist-EF-SGDM, server replicated, blocks of 100",
            lambda **kw: EFSignSGDM(momentum=0.9, topology="allgather", block_size=100, **kw),
            _sgd,
        ),
        Entry("powersgd", "PowerSGD rank 2", lambda **kw: PowerSGD(rank=2, **kw)),
        Entry("cser", "CSER, GRBS reset every 2 steps", lambda **kw: CSER(grad_ratio=4, model_ratio=2, period=2, **kw)),
        Entry(
            "cser-topk-reset",
            "CSER, top-k reset every 2 steps",
            lambda **kw: CSER(grad_ratio=4, model_ratio=2, period=2, model_compressor="topk", **kw),
        ),
        *(
            Entry(f"qsparse-{kind}", f"Qsparse, {kind}, sync every 2 steps", _qsparse(kind))
            for kind in ("signtopk", "qtopk", "randk", "sign", "qsgd")
        ),
        Entry(
            "qsparse-topk-p1", "Qsparse, top-k every step", lambda **kw: QsparseLocalSGD("topk", k=0.1, period=1, **kw)
        ),
        Entry(
            "qsparse-staggered",
            "Qsparse, asynchronous: workers take turns every 2 steps",
            lambda **kw: QsparseLocalSGD("signtopk", k=0.1, period=2, schedule="staggered", **kw),
        ),
        Entry(
            "diloco-streaming",
            "DiLoCo, 2 fragments, int8, applied 1 step late",
            lambda **kw: DiLoCo(period=2, fragments=2, delay=1, compressor="int8", **kw),
            _adamw,
            lr_scale=0.02,
        ),
        Entry("laq-dense", "LAQ, dense wire", lambda **kw: LAQ(bits=4, wire="dense", **kw), _sgd),
        Entry("laq-uploads", "LAQ, uploads wire (reads its flags on the host)", lambda **kw: LAQ(bits=4, **kw), _sgd),
    ]
}
HOST_READS_BY_DESIGN = ("laq-uploads",)


def build(name: str, ddp: torch.nn.Module, lr: float, **options: Any) -> Setup:
    """Build entry ``name`` on ``ddp`` (``options``: to the state, e.g. ``node_size``); raises
    ValueError for an unknown name."""
    if name not in ENTRIES:
        raise ValueError(f"hook must be one of {sorted(ENTRIES)}, got {name!r}")
    return ENTRIES[name].build(ddp, lr, **options)
