"""DiLoCo: Douillard et al., *DiLoCo: Distributed Low-Communication Training of Language
Models*, 2023.

Every worker takes ``period`` (``H``) steps of its own inner optimizer (AdamW in the paper: the
user's optimizer, whatever it is) from the global model; then the pseudo-gradients
``Delta_i = x_global - x_i`` are averaged and an outer SGD step with Nesterov momentum moves
the global model (the paper's 0.7 learning rate and 0.9 momentum):

    m = mu m + mean_i Delta_i;   x_global -= outer_lr (mean_i Delta_i + mu m);   x_i = x_global

Between synchronizations nothing but one flag per step travels (the ranks agree whether the
step was finite). With a ``compressor`` the pseudo-gradients travel compressed, each worker
keeping the part its message left out for the next synchronization (error feedback): the
local-step machinery of :class:`~ddp_hooks.algorithms.qsparse.QsparseLocalSGD`, of which this
is the outer-optimizer preset. Memory per parameter: the global model, the outer momentum and
the error feedback (three model copies).

Streaming DiLoCo (Douillard et al., 2025): ``fragments=F`` synchronizes the parameters in ``F``
fragments at staggered steps, ``delay=tau`` applies each exchange ``tau`` inner steps after it
was launched (mixing the late global fragment with the local progress), so the link carries a
steady ``1/F`` of the model and the exchange overlaps compute.

SparseLoCo (Sarfi et al., 2025) replaces the outer momentum with the error-feedback
accumulator itself: ``e = beta e + Delta_i``, the top-k of ``e`` quantized to 2 bits is sent and
subtracted from ``e``, and the global model takes the plain mean of what was sent.
"""

from dataclasses import dataclass

from typing_extensions import Unpack

from ..core import OneOf, Runtime, setting
from .local_settings import QsparseSettings
from .qsparse import QsparseLocalSGD

_PERIOD_DOC = "inner steps ``H`` between synchronizations, at least 2"


@dataclass(frozen=True, kw_only=True)
class DiLoCoSettings(QsparseSettings):
    """DiLoCo's hyper-parameters: Qsparse-local-SGD's with the paper's outer optimizer."""

    period: int = QsparseSettings.redefault("period", 500, f"{_PERIOD_DOC} (the paper: 500).")
    outer_lr: float = QsparseSettings.redefault("outer_lr", 0.7, "the outer SGD step's learning rate (the paper: 0.7).")
    outer_momentum: float = QsparseSettings.redefault("outer_momentum", 0.9, "its Nesterov momentum (the paper: 0.9).")
    compressor: str = QsparseSettings.redefault(
        "compressor",
        "none",
        '``"none"`` (fp32 pseudo-gradients, one all-reduce; None says the same), or one of '
        'Qsparse-local-SGD\'s compressors (``"topk"``, ``"signtopk"``, ``"int8"``, ...), with error feedback.',
    )
    k: int | float = QsparseSettings.redefault("k", 0.01)

    def check(self) -> None:
        super().check()
        _needs_local_steps("DiLoCo", self.period)


@dataclass(frozen=True, kw_only=True)
class SparseLoCoSettings(QsparseSettings):
    """SparseLoCo's hyper-parameters: the compressor is the top-k quantized to ``bits``."""

    period: int = QsparseSettings.redefault("period", 50, f"{_PERIOD_DOC}.")
    k: int | float = QsparseSettings.redefault("k", 0.02, "elements kept per tensor (2%: the paper's).")
    bits: int = setting(2, OneOf((2, 8)), "code bits of each kept value.")
    compressor: str = QsparseSettings.redefault("compressor", "topk-2bit", "set by ``bits``.")
    error_decay: float = QsparseSettings.redefault("error_decay", 0.95, "the accumulator's decay ``beta``.")

    def check(self) -> None:
        if self.compressor not in ("topk-2bit", "topk-int8"):
            raise ValueError(f"SparseLoCo's compressor is set by bits, got {self.compressor!r}")
        object.__setattr__(self, "compressor", "topk-2bit" if self.bits == 2 else "topk-int8")
        super().check()
        _needs_local_steps("SparseLoCo", self.period)


class DiLoCo(QsparseLocalSGD):
    """DiLoCo state.

    ``state = ddp_hooks.DiLoCo(period=50).register(ddp, torch.optim.AdamW(ddp.parameters()))``
    """

    settings_type = DiLoCoSettings

    def __init__(
        self,
        period: int = 500,
        *,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        compressor: str | None = "none",
        k: int | float = 0.01,
        levels: int = 16,
        seed: int = 0,
        fragments: int = 1,
        delay: int = 0,
        mix: float = 0.5,
        **runtime: Unpack[Runtime],
    ) -> None:
        compressor = "none" if compressor is None else compressor
        self._start(DiLoCoSettings.of(locals()), runtime)


class SparseLoCo(QsparseLocalSGD):
    """SparseLoCo state: DiLoCo's inner steps, pseudo-gradients sent as the 2-bit (or 8-bit)
    top-k of an error-feedback accumulator that decays by ``error_decay``, outer step the plain
    mean (``outer_lr``, no momentum: the accumulator plays its part).

    ``state = ddp_hooks.SparseLoCo(period=50, k=0.02).register(ddp, torch.optim.AdamW(ddp.parameters()))``
    """

    settings_type = SparseLoCoSettings

    def __init__(
        self,
        period: int = 50,
        *,
        k: int | float = 0.02,
        bits: int = 2,
        error_decay: float = 0.95,
        outer_lr: float = 1.0,
        seed: int = 0,
        fragments: int = 1,
        delay: int = 0,
        mix: float = 0.5,
        **runtime: Unpack[Runtime],
    ) -> None:
        self._start(SparseLoCoSettings.of(locals()), runtime)


def _needs_local_steps(name: str, period: int) -> None:
    """The presets are local-step algorithms: ``period`` of at least 2."""
    if period < 2:
        raise ValueError(f"period must be at least 2 for {name} (with 1, use QsparseLocalSGD), got {period}")
