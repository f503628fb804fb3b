"""ddp-hooks: communication-compression hooks for PyTorch DistributedDataParallel.

Register a hook on an existing DDP model in one line::

    import ddp_hooks as dh
    state = dh.AllReduce().register(ddp)
    ...
    print(state.stats())
"""

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
from .algorithms.cser import overall_ratio as cser_ratio
from .algorithms.cser import propose as cser_configs
from .core import HookState, SyncOptimizer, comm_hook

__version__ = "0.1.0"

__all__ = [
    "AllReduce",
    "BF16Compress",
    "CSER",
    "EFSignSGDM",
    "FP16Compress",
    "HookState",
    "LAQ",
    "PowerSGD",
    "QsparseLocalSGD",
    "SyncOptimizer",
    "comm_hook",
    "cser_configs",
    "cser_ratio",
]
