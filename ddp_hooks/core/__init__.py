"""What every algorithm shares: the hook state base, memory, stats, the optimizer wrapper."""

from .checks import check_choice, check_float, check_int, nonfinite
from .memory import ParameterMemory
from .state import HookState, comm_hook
from .stats import Stats
from .wrapper import PeriodicSyncOptimizer, SyncOptimizer

__all__ = [
    "HookState",
    "ParameterMemory",
    "PeriodicSyncOptimizer",
    "Stats",
    "SyncOptimizer",
    "check_choice",
    "check_float",
    "check_int",
    "comm_hook",
    "nonfinite",
]
