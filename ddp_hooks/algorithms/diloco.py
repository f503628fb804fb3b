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
"""

from typing_extensions import Unpack

from ..core import Runtime
from .qsparse import QsparseLocalSGD


class DiLoCo(QsparseLocalSGD):
    """DiLoCo state.

    ``state = ddp_hooks.DiLoCo(period=50).register(ddp, torch.optim.AdamW(ddp.parameters()))``

    Args:
        period: inner steps ``H`` between synchronizations, at least 2 (the paper: 500).
        outer_lr: the outer SGD step's learning rate, in (0, 10] (the paper: 0.7).
        outer_momentum: its Nesterov momentum, in [0, 1) (the paper: 0.9).
        compressor: None (fp32 pseudo-gradients), or one of Qsparse-local-SGD's compressors
            (``"topk"``, ``"signtopk"``, ``"qtopk"``, ``"qsgd"``, ...), with error feedback.
        k: elements kept per tensor by a sparsifying compressor (count, or fraction in (0, 1)).
        levels: quantization levels of ``qtopk`` / ``qsgd``.
        seed: the generators of the random compressors.
        **runtime: the options every state takes (:class:`~ddp_hooks.core.Runtime`).
    """

    def __init__(
        self,
        period: int = 500,
        *,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        compressor: str | None = None,
        k: int | float = 0.01,
        levels: int = 16,
        seed: int = 0,
        **runtime: Unpack[Runtime],
    ) -> None:
        super().__init__(
            "none" if compressor is None else compressor,
            k=k,
            period=period,
            levels=levels,
            seed=seed,
            outer_lr=outer_lr,
            outer_momentum=outer_momentum,
            **runtime,
        )
        if self.period < 2:
            raise ValueError(f"period must be at least 2 for DiLoCo (with 1, use QsparseLocalSGD), got {period}")
