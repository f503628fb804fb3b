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
from ..compress.sparse_plan import MessagePlan
from ..core import Bucket, Generators, HookState, Runtime, poison
from ..core.layouts import LayoutCache
from .local_settings import QsparseSettings
from .outer import OuterSteps
from .schedules import Schedule


class QsparseLocalSGD(OuterSteps, HookState):
    """Qsparse-local-SGD state.

    ``state = ddp_hooks.QsparseLocalSGD("signtopk", k=1000, period=8).register(ddp, optimizer)``

    """

    settings_type = QsparseSettings
    settings: QsparseSettings

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
        self._start(QsparseSettings.of(locals()), runtime)

    def _start(self, settings: QsparseSettings, runtime: Runtime) -> None:
        """The constructor's work once the settings are known (shared by the presets)."""
        super().__init__(settings, **runtime)
        self.schedule = Schedule(settings.schedule, settings.period, settings.seed)
        self._init_outer()
        self.rng = Generators(settings.seed)
        self._plans = LayoutCache(lambda params: MessagePlan(params, settings.compressor, settings.k, settings.levels))
        # fp32 workspaces of a layout (p = g + e or the progress, the decoded mean): none per step
        self._workspaces = LayoutCache(
            lambda params: [torch.empty(sum(t.numel() for t in params), device=params[0].device) for _ in range(2)]
        )
        self._lr_at_sync: list[float] | None = None
        self.memory_slots = ("error",) if settings.period == 1 else self.outer_slots()

    @property
    def sync_every(self) -> int:
        return self.settings.period if self.settings.period > 1 else 0

    def needs_last_bucket(self) -> bool:
        return self.settings.period > 1  # local phases agree on finiteness at the step's last bucket

    def on_bind(self) -> None:
        self.rng.bind(self.rank)

    def on_attach(self) -> None:
        if self.settings.period > 1:
            self.start_outer()

    # ---- the hook ---------------------------------------------------------------------------
    def reduce(self, bucket: Bucket, step: int) -> Future[torch.Tensor]:
        if self.settings.period > 1:  # local steps: nothing leaves this rank but one finiteness flag
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
            payload, local = plan.encode_ef(grads, candidate.split(bucket.numels), (self.rng.own, self.rng.shared))
        self.count_bits(step, plan.paper_bits)

        def finish(gathered: torch.Tensor) -> torch.Tensor:
            with self.time(step, "decompress", buf.device):
                bad = plan.mean(gathered, out.split(bucket.numels), local)
                ws[0] = self.memory.commit("error", params, candidate, unless=bad)
                buf.copy_(out)
                return poison(buf, bad)

        return chain(self.transport.all_gather(payload, step), finish)

    # ---- synchronization (period > 1: :mod:`.outer`) ------------------------------------------
    def before_send(self, params: list[torch.Tensor]) -> None:
        """Zero the memory at a learning-rate change, if asked to."""
        lrs = self.learning_rates(params)
        if self.settings.wipe_memory_on_lr_change and self._lr_at_sync is not None and lrs != self._lr_at_sync:
            self.memory.clear("memory")
        self._lr_at_sync = lrs

    # ---- checkpoints ---------------------------------------------------------------------------
    def extra_state_dict(self) -> dict[str, Any]:
        own = {"rng": self.rng.state_dict(), "lr_at_sync": self._lr_at_sync}
        return {**own, **self.local_state_dict(), **self.flights_state_dict()}

    def extra_problems(self, extra: Any) -> list[str]:
        lrs = extra.get("lr_at_sync")
        ok_lrs = lrs is None or (isinstance(lrs, list) and all(isinstance(v, (int, float)) for v in lrs))
        return (
            Generators.problems(extra.get("rng"))
            + self.local_problems(extra)
            + self.flights_problems(extra)
            + ([] if ok_lrs else ["extra['lr_at_sync'] must be None or a list of floats"])
        )

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.load_state_dict(state["rng"])
        self._lr_at_sync = state["lr_at_sync"]
        self.load_local_state_dict(state)
        self.load_flights_state_dict(state)
