"""What every algorithm shares: the state base, memory, flags, checks, stats, checkpoints."""

from .agree import ConfigMismatch
from .binding import Runtime
from .bucket import Bucket
from .checks import check_bool, check_choice, check_float, check_int, check_seed
from .flags import (
    add_unless,
    as_flag,
    is_set,
    keep_unless,
    may_read_host,
    nonfinite,
    poison,
    split_flag,
    sync_free,
    with_flag,
    write_flag,
)
from .held import Held
from .memory import ParameterMemory
from .rng import Generators
from .settings import SEED, Choice, CountOrFraction, Flag, Float, Int, Maybe, OneOf, Settings, setting
from .state import HookState, comm_hook
from .stats import Stats

__all__ = [
    "SEED",
    "Bucket",
    "Choice",
    "CountOrFraction",
    "Flag",
    "Float",
    "Int",
    "Maybe",
    "OneOf",
    "Settings",
    "setting",
    "ConfigMismatch",
    "Generators",
    "Held",
    "HookState",
    "ParameterMemory",
    "Runtime",
    "Stats",
    "add_unless",
    "as_flag",
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_seed",
    "comm_hook",
    "is_set",
    "keep_unless",
    "nonfinite",
    "poison",
    "may_read_host",
    "split_flag",
    "sync_free",
    "with_flag",
    "write_flag",
]
