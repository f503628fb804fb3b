"""Qsparse-local-SGD: composed quantize-and-sparsify operators with local steps and error
compensation (Basu, Data, Karakus, Diggavi, NeurIPS 2019; docs/algorithms.md, "Qsparse").

With ``period = H > 1`` the hook keeps gradients local between synchronizations (local SGD,
local momentum in the user's optimizer), and after every ``H`` optimizer steps the state
synchronizes (synchronous Qsparse-local-SGD)::

    Delta_i = mem_i + (x_last - x_i)     net local progress plus the error memory
    q_i     = QComp(Delta_i)             per tensor: SignTopK, QTopK, TopK, RandK, sign, QSGD
    mem_i   = Delta_i - q_i              (parameter units)
    x       = x_last - mean_j q_j        every rank; then x_i = x_last = x

realized with one all-gather of the fixed-size sparse payloads and a scatter-add on every rank.
If any rank's progress is not finite, nothing moves: every rank returns to ``x_last`` and the
memory keeps its value. The memory is kept across learning-rate changes, as in the paper
(with ``period > 1`` it is in parameter units, which a new learning rate does not rescale);
``wipe_memory_on_lr_change=True`` zeroes it at the first synchronization after a change.

With ``period = 1`` it is error-compensated compressed SGD as a plain gradient hook
(gradient units, momentum in the optimizer after aggregation): ``p_i = g_i + e_i``,
``q_i = QComp(p_i)``, ``e_i = p_i - q_i``, gradient ``= mean_j q_j``.

Asynchronous mode (``schedule="staggered"`` or ``"random"``): each worker synchronizes on its
own schedule (any gap at most ``H``) with the master model, which takes each worker's
compressed update ``q_r / n`` as it arrives. Every rank keeps a replica of the master (one more
model copy), the due workers' payloads cross, every rank applies them in worker order, and the
due workers adopt the master (:mod:`.outer`). ``fragments`` and ``delay`` stream the
synchronization (Streaming DiLoCo): fragment ``f`` of the parameters is exchanged every ``H``
steps at offset ``f H / F``, and applied ``delay`` steps later.
"""

from typing import Any

import torch
from torch.futures import Future
from typing_extensions import Unpack

from ..comm import chain
from ..compress.sparse import KINDS
from ..compress.sparse_plan import MessagePlan
from ..core import (
    Bucket,
    Generators,
    HookState,
    Runtime,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_seed,
    poison,
)
from ..core.layouts import LayoutCache
from .outer import OuterSteps
from .schedules import SCHEDULES, Schedule


class QsparseLocalSGD(OuterSteps, HookState):
    """Qsparse-local-SGD state.

    ``state = ddp_hooks.QsparseLocalSGD("signtopk", k=1000, period=8).register(ddp, optimizer)``

    Args:
        compressor: ``"signtopk"`` (the paper's choice), ``"qtopk"``, ``"topk"``, ``"randk"``,
            ``"grbs"`` (shared random elements: with ``period=1`` EF-SGD over GRBS, the CSER
            paper's baseline), ``"sign"`` (EF-signSGD), ``"qsgd"``, the uniform quantizers
            ``"int8"`` / ``"2bit"`` (dense) and ``"topk-int8"`` / ``"topk-2bit"`` (of the top-k),
            or ``"none"`` (fp32).
        k: elements kept per tensor, a count (int >= 1) or a fraction in (0, 1).
        period: local steps between synchronizations ``H`` (1: a plain gradient hook).
        levels: quantization levels ``s`` for ``qtopk`` / ``qsgd``, in [1, 255].
        wipe_memory_on_lr_change: zero the error memory when the learning rate changed since
            the last synchronization (default False: the paper keeps it).
        seed: seeds the per-worker generator (offset by rank) for randk and stochastic rounding,
            and the generator all ranks share for grbs.
        outer_lr: with ``period > 1``, the outer step's learning rate on the averaged compressed
            progress ``Delta`` (default 1: ``x_last -= Delta``, the paper's averaging), in (0, 10].
        outer_momentum: the outer step's Nesterov momentum ``mu`` in [0, 1) (default 0): ``m = mu
            m + Delta``, ``x_last -= outer_lr (Delta + mu m)`` (DiLoCo's outer optimizer; see
            :class:`~ddp_hooks.algorithms.diloco.DiLoCo`).
        schedule: ``"sync"`` (default: every worker every ``period`` steps), or asynchronous:
            ``"staggered"`` (worker ``r`` of ``n`` at offset ``r period / n``) or ``"random"``
            (seeded gaps of ``ceil(period/2) ... period`` steps, different per worker).
        fragments: ``F`` >= 1, at most ``period``: the parameters in ``F`` consecutive groups of
            whole tensors balanced by size, fragment ``f`` synchronized every ``period`` steps at
            offset ``f period / F`` (streaming: the link carries ``1/F`` of the model at a time).
        delay: ``tau`` in [0, period): the exchange launched after a step is applied ``tau``
            steps later, overlapping the inner steps in between (streaming).
        mix: when a delayed exchange lands, the worker takes ``mix x_local + (1 - mix) x``, in
            [0, 1) (default 0.5).
        error_decay: ``beta`` in (0, 1]: the memory decays by ``beta`` before the next progress
            is added (SparseLoCo's error-feedback accumulator; default 1: the paper's memory).
        **runtime: the options every state takes (:class:`~ddp_hooks.core.Runtime`).
    """

    def __init__(
        self,
        compressor: str = "signtopk",
        k: int | float = 1000,
        period: int = 8,
        *,
        levels: int = 16,
        wipe_memory_on_lr_change: bool = False,
        seed: int = 0,
        outer_lr: float = 1.0,
        outer_momentum: float = 0.0,
        schedule: str = "sync",
        fragments: int = 1,
        delay: int = 0,
        mix: float = 0.5,
        error_decay: float = 1.0,
        **runtime: Unpack[Runtime],
    ) -> None:
        self.compressor = check_choice("compressor", compressor, set(KINDS))
        if isinstance(k, float) and k < 1:
            self.k: int | float = check_float("k", k, 0.0, 1.0, low_open=True, high_open=True)
        else:
            self.k = check_int("k", k, 1)
        self.period = check_int("period", period, 1)
        self.levels = check_int("levels", levels, 1, 255)
        self.wipe_memory_on_lr_change = check_bool("wipe_memory_on_lr_change", wipe_memory_on_lr_change)
        self.seed = check_seed("seed", seed)
        self.outer_lr = check_float("outer_lr", outer_lr, 0.0, 10.0, low_open=True)
        self.outer_momentum = check_float("outer_momentum", outer_momentum, 0.0, 1.0, high_open=True)
        self._check_streaming(schedule, fragments, delay, mix, error_decay)
        super().__init__(**runtime)
        self.schedule = Schedule(schedule, self.period, self.seed)
        self._init_outer()
        self.rng = Generators(self.seed)
        self._plans = LayoutCache(lambda params: MessagePlan(params, self.compressor, self.k, self.levels))
        # fp32 workspaces of a layout (p = g + e or the progress, the decoded mean): none per step
        self._workspaces = LayoutCache(
            lambda params: [torch.empty(sum(t.numel() for t in params), device=params[0].device) for _ in range(2)]
        )
        self._lr_at_sync: list[float] | None = None
        self.memory_slots = ("error",) if self.period == 1 else self.outer_slots()

    def _check_streaming(self, schedule: str, fragments: int, delay: int, mix: float, decay: float) -> None:
        check_choice("schedule", schedule, set(SCHEDULES))
        self.fragments = check_int("fragments", fragments, 1, max(1, self.period))
        self.delay = check_int("delay", delay, 0, self.period - 1)
        self.mix = check_float("mix", mix, 0.0, 1.0, high_open=True)
        self.error_decay = check_float("error_decay", decay, 0.0, 1.0, low_open=True)
        if schedule != "sync" and (self.period == 1 or self.fragments > 1 or self.delay):
            raise ValueError(f"schedule={schedule!r} needs period > 1, fragments=1 and delay=0")
        if self.compressor == "grbs" and (schedule != "sync" or self.delay):
            raise ValueError("compressor 'grbs' draws its elements together on every rank: schedule='sync', delay=0")
        if self.fragments > 1 and self.wipe_memory_on_lr_change:
            raise ValueError("wipe_memory_on_lr_change works with fragments=1")

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "compressor": self.compressor,
            "k": self.k,
            "period": self.period,
            "levels": self.levels,
            "wipe_memory_on_lr_change": self.wipe_memory_on_lr_change,
            "seed": self.seed,
            **self._outer_config(),
        }

    def _outer_config(self) -> dict[str, Any]:
        """The outer loop's settings, where they differ from the paper's synchronous averaging
        (so that configurations and checkpoints of plain Qsparse-local-SGD stay as they were)."""
        out: dict[str, Any] = {}
        if self.outer_lr != 1.0 or self.outer_momentum:
            out.update(outer_lr=self.outer_lr, outer_momentum=self.outer_momentum)
        if self.schedule.kind != "sync":
            out["schedule"] = self.schedule.kind
        if self.fragments > 1 or self.delay:
            out.update(fragments=self.fragments, delay=self.delay, mix=self.mix)
        if self.error_decay != 1.0:
            out["error_decay"] = self.error_decay
        return out

    @property
    def sync_every(self) -> int:
        return self.period if self.period > 1 else 0

    def needs_last_bucket(self) -> bool:
        return self.period > 1  # local phases agree on finiteness at the step's last bucket

    def on_bind(self) -> None:
        self.rng.bind(self.rank)

    def on_attach(self) -> None:
        if self.period > 1:
            self.start_outer()

    # ---- the hook ---------------------------------------------------------------------------
    def reduce(self, bucket: Bucket, step: int) -> Future[torch.Tensor]:
        if self.period > 1:  # local steps: nothing leaves this rank but one finiteness flag
            return self.keep_local(bucket, step)
        return self._error_compensated(bucket, step)

    def _error_compensated(self, bucket: Bucket, step: int) -> Future[torch.Tensor]:
        """``period = 1``: v = g + e; q = QComp(v); e = v - q; gradient = mean_j q_j."""
        params, buf = bucket.params, bucket.buffer
        plan = self._plans.get(params, step)
        ws = self._workspaces.get(params, step)
        candidate, out = ws
        with self.time(step, "compress", buf.device):
            candidate.copy_(self.memory.flat("error", params))
            grads = buf.float().split(bucket.numels) if buf.dtype != torch.float32 else buf.split(bucket.numels)
            payload, local = plan.encode_ef(grads, candidate.split(bucket.numels), (self.rng.rank, self.rng.shared))
        self.count_bits(step, plan.paper_bits)

        def finish(gathered: torch.Tensor) -> torch.Tensor:
            with self.time(step, "decompress", buf.device):
                bad = plan.mean(gathered, out.split(bucket.numels), local)
                ws[0] = self.memory.commit("error", params, candidate, ~bad)
                buf.copy_(out)
                return poison(buf, bad)

        return chain(self.transport.all_gather(payload, step), finish)

    # ---- synchronization (period > 1: :mod:`.outer`) ------------------------------------------
    def before_send(self, params: list[torch.Tensor]) -> None:
        """Zero the memory at a learning-rate change, if asked to."""
        lrs = self.learning_rates(params)
        if self.wipe_memory_on_lr_change and self._lr_at_sync is not None and lrs != self._lr_at_sync:
            self.memory.clear("memory")
        self._lr_at_sync = lrs

    # ---- checkpoints ---------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        own = {"rng": self.rng.state_dict(), "lr_at_sync": self._lr_at_sync}
        return {**own, **self.local_state(), **self.flights_state()}

    def check_extra(self, extra: Any) -> list[str]:
        lrs = extra.get("lr_at_sync")
        ok_lrs = lrs is None or (isinstance(lrs, list) and all(isinstance(v, (int, float)) for v in lrs))
        return (
            Generators.problems(extra.get("rng"))
            + self.check_local_state(extra)
            + self.check_flights(extra)
            + ([] if ok_lrs else ["extra['lr_at_sync'] must be None or a list of floats"])
        )

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rng.load_state_dict(state["rng"])
        self._lr_at_sync = state["lr_at_sync"]
        self.load_local_state(state)
        self.load_flights(state)
