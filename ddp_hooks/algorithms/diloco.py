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
        fragments: streaming: the parameters in this many fragments, synchronized in turn.
        delay: streaming: inner steps between an exchange's launch and its use, in [0, period).
        mix: streaming: the weight of the local model when a delayed exchange lands.
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
        fragments: int = 1,
        delay: int = 0,
        mix: float = 0.5,
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
            fragments=fragments,
            delay=delay,
            mix=mix,
            **runtime,
        )
        _needs_local_steps("DiLoCo", self.period)


class SparseLoCo(QsparseLocalSGD):
    """SparseLoCo state: DiLoCo's inner steps, pseudo-gradients sent as the 2-bit (or 8-bit)
    top-k of an error-feedback accumulator that decays by ``error_decay``, outer step the plain
    mean (``outer_lr``, no momentum: the accumulator plays its part).

    ``state = ddp_hooks.SparseLoCo(period=50, k=0.02).register(ddp, torch.optim.AdamW(ddp.parameters()))``

    Args:
        period: inner steps ``H`` between synchronizations, at least 2.
        k: elements kept per tensor (fraction in (0, 1), or a count): default 2%.
        bits: code bits of each kept value, 2 (default) or 8.
        error_decay: the accumulator's decay ``beta`` in (0, 1] (default 0.95).
        outer_lr: the outer step's learning rate, in (0, 10] (default 1).
        seed, fragments, delay, mix: as for :class:`DiLoCo`.
        **runtime: the options every state takes (:class:`~ddp_hooks.core.Runtime`).
    """

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
        if bits not in (2, 8):
            raise ValueError(f"bits must be 2 or 8, got {bits!r}")
        super().__init__(
            "topk-2bit" if bits == 2 else "topk-int8",
            k=k,
            period=period,
            seed=seed,
            outer_lr=outer_lr,
            error_decay=error_decay,
            fragments=fragments,
            delay=delay,
            mix=mix,
            **runtime,
        )
        _needs_local_steps("SparseLoCo", self.period)


def _needs_local_steps(name: str, period: int) -> None:
    """The presets are local-step algorithms: ``period`` of at least 2."""
    if period < 2:
        raise ValueError(f"period must be at least 2 for {name} (with 1, use QsparseLocalSGD), got {period}")
