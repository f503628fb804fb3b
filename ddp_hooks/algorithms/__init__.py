"""One module per paper: a state class and its hook (and an optimizer wrapper where needed)."""

from .baselines import AllReduce, BF16Compress, FP16Compress
from .cser import CSER, CSEROptimizer
from .ef_signsgdm import EFSignSGDM
from .laq import LAQ, LAQOptimizer
from .powersgd import PowerSGD
from .qsparse import QsparseLocalSGD, QsparseOptimizer

__all__ = ["AllReduce", "BF16Compress", "CSER", "CSEROptimizer", "EFSignSGDM", "FP16Compress", "LAQ", "LAQOptimizer", "PowerSGD", "QsparseLocalSGD", "QsparseOptimizer"]
