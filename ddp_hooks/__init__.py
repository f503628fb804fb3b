"""ddp-hooks: communication-compression hooks for PyTorch DistributedDataParallel.

Register a hook on an existing DDP model in one line::

    import ddp_hooks as dh
    state = dh.EFSignSGDM(momentum=0.9).register(ddp, optimizer)
    ...
    print(state.stats())
"""

from ._version import __version__
from .algorithms.cser_ratio import overall_ratio as cser_ratio
from .algorithms.cser_ratio import propose as cser_configs
from .catalog import *  # noqa: F403 - every algorithm class, as the catalog lists them
from .catalog import __all__ as _algorithms
from .comm import CollectiveError
from .core import ConfigMismatch, HookState, comm_hook

__all__ = [
    *_algorithms,
    "CollectiveError",
    "ConfigMismatch",
    "HookState",
    "__version__",
    "comm_hook",
    "cser_configs",
    "cser_ratio",
]
