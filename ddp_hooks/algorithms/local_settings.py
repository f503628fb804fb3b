"""The hyper-parameters of Qsparse-local-SGD and its family (asynchronous schedules, an outer
optimizer, streaming), shared by :class:`~ddp_hooks.algorithms.qsparse.QsparseLocalSGD` and its
presets :class:`~ddp_hooks.algorithms.diloco.DiLoCo` and ``SparseLoCo``."""

from dataclasses import dataclass
from typing import Any

from ..compress.sparse import KINDS
from ..core import SEED, Choice, CountOrFraction, Flag, Float, Int, Settings, check_int, setting
from .schedules import SCHEDULES


@dataclass(frozen=True, kw_only=True)
class QsparseSettings(Settings):
    """Qsparse-local-SGD's hyper-parameters."""

    compressor: str = setting(
        "signtopk",
        Choice(tuple(KINDS)),
        '``"signtopk"`` (the paper\'s choice), ``"qtopk"``, ``"topk"``, ``"randk"``, ``"grbs"`` (shared '
        'random elements: with ``period=1`` EF-SGD over GRBS, the CSER paper\'s baseline), ``"sign"`` '
        '(EF-signSGD), ``"qsgd"``, the uniform quantizers ``"int8"`` / ``"2bit"`` (dense) and '
        '``"topk-int8"`` / ``"topk-2bit"`` (of the top-k), or ``"none"`` (fp32).',
    )
    k: int | float = setting(1000, CountOrFraction(), "elements kept per tensor by a sparsifying compressor.")
    period: int = setting(8, Int(1), "local steps ``H`` between synchronizations (1: a plain gradient hook).")
    levels: int = setting(16, Int(1, 255), "quantization levels ``s`` for ``qtopk`` / ``qsgd``.")
    wipe_memory_on_lr_change: bool = setting(
        False,
        Flag(),
        "zero the error memory when the learning rate changed since the last synchronization (the paper keeps it).",
    )
    seed: int = setting(
        0,
        SEED,
        "seeds the per-worker generator (offset by rank) for randk and stochastic rounding, and the "
        "generator all ranks share for grbs.",
    )
    outer_lr: float = setting(
        1.0,
        Float(0.0, 10.0, low_open=True),
        "with ``period > 1``, the outer step's learning rate on the averaged compressed progress "
        "``Delta`` (1: ``x_last -= Delta``, the paper's averaging).",
    )
    outer_momentum: float = setting(
        0.0,
        Float(0.0, 1.0, high_open=True),
        "the outer step's Nesterov momentum ``mu``: ``m = mu m + Delta``, ``x_last -= outer_lr (Delta + "
        "mu m)`` (DiLoCo's outer optimizer).",
    )
    schedule: str = setting(
        "sync",
        Choice(tuple(SCHEDULES)),
        '``"sync"``: every worker every ``period`` steps; asynchronous: ``"staggered"`` (worker ``r`` of '
        '``n`` at offset ``r period / n``) or ``"random"`` (seeded gaps of ``ceil(period/2) ... period`` '
        "steps, different per worker).",
    )
    fragments: int = setting(
        1,
        Int(1),
        "``F``, at most ``period``: the parameters in ``F`` consecutive groups of whole tensors balanced "
        "by size, fragment ``f`` synchronized every ``period`` steps at offset ``f period / F`` "
        "(streaming: the link carries ``1/F`` of the model at a time).",
    )
    delay: int = setting(
        0,
        Int(0),
        "``tau`` in [0, period): the exchange launched after a step is applied ``tau`` steps later, "
        "overlapping the inner steps in between (streaming).",
    )
    mix: float = setting(
        0.5,
        Float(0.0, 1.0, high_open=True),
        "when a delayed exchange lands, the worker takes ``mix x_local + (1 - mix) x``.",
    )
    error_decay: float = setting(
        1.0,
        Float(0.0, 1.0, low_open=True),
        "``beta``: the memory decays by ``beta`` before the next progress is added (SparseLoCo's "
        "error-feedback accumulator; 1: the paper's memory).",
    )

    def check(self) -> None:
        check_int("fragments", self.fragments, 1, max(1, self.period))
        check_int("delay", self.delay, 0, self.period - 1)
        if self.schedule != "sync" and (self.period == 1 or self.fragments > 1 or self.delay):
            raise ValueError(f"schedule={self.schedule!r} needs period > 1, fragments=1 and delay=0")
        if self.compressor == "grbs" and (self.schedule != "sync" or self.delay):
            raise ValueError("compressor 'grbs' draws its elements together on every rank: schedule='sync', delay=0")
        if self.fragments > 1 and self.wipe_memory_on_lr_change:
            raise ValueError("wipe_memory_on_lr_change works with fragments=1")

    def identity(self) -> dict[str, Any]:
        """The paper's fields, then the outer loop's where they differ from its synchronous
        averaging (so that configurations and checkpoints of plain Qsparse-local-SGD stay as
        they were)."""
        out: dict[str, Any] = {
            "compressor": self.compressor,
            "k": self.k,
            "period": self.period,
            "levels": self.levels,
            "wipe_memory_on_lr_change": self.wipe_memory_on_lr_change,
            "seed": self.seed,
        }
        if self.outer_lr != 1.0 or self.outer_momentum:
            out.update(outer_lr=self.outer_lr, outer_momentum=self.outer_momentum)
        if self.schedule != "sync":
            out["schedule"] = self.schedule
        if self.fragments > 1 or self.delay:
            out.update(fragments=self.fragments, delay=self.delay, mix=self.mix)
        if self.error_decay != 1.0:
            out["error_decay"] = self.error_decay
        return out
