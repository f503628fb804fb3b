"""One module per paper: a state class and its hook."""

from .baselines import AllReduce, BF16Compress, FP16Compress
from .cser import CSER
from .ef_signsgdm import EFSignSGDM
from .laq import LAQ
from .powersgd import PowerSGD
from .qsparse import QsparseLocalSGD

__all__ = ["CSER", "LAQ", "AllReduce", "BF16Compress", "EFSignSGDM", "FP16Compress", "PowerSGD", "QsparseLocalSGD"]
