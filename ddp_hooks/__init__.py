"""ddp-hooks: communication-compression hooks for PyTorch DistributedDataParallel.

Register a hook on an existing DDP model in one line::

    import ddp_hooks as dh
    state = dh.EFSignSGDM(momentum=0.9).register(ddp, optimizer)
    ...
    print(state.stats())
"""

from ._version import __version__
from .algorithms import (
    CSER,
    LAQ,
    AllReduce,
    BF16Compress,
    EFSignSGDM,
    FP16Compress,
    PowerSGD,
    QsparseLocalSGD,
)
from .algorithms.cser_ratio import overall_ratio as cser_ratio
from .algorithms.cser_ratio import propose as cser_configs
from .comm import CollectiveError
from .core import ConfigMismatch, HookState, comm_hook

__all__ = [
    "CSER",
    "LAQ",
    "AllReduce",
    "BF16Compress",
    "CollectiveError",
    "ConfigMismatch",
    "EFSignSGDM",
    "FP16Compress",
    "HookState",
    "PowerSGD",
    "QsparseLocalSGD",
    "__version__",
    "comm_hook",
    "cser_configs",
    "cser_ratio",
]
