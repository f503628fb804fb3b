"""Qsparse-local-SGD: composed quantize-and-sparsify operators with local steps and error
compensation (Basu, Data, Karakus, Diggavi, NeurIPS 2019; ALGORITHMS.md section 3).

With ``period = H > 1`` the hook is a no-op between synchronizations (local SGD, local momentum)
and every ``H`` local steps the optimizer wrapper synchronizes (synchronous Qsparse-local-SGD)::

    Delta_i = mem_i + (x_last - x_i)     net local progress plus the error memory
    q_i     = QComp(Delta_i)             per tensor: SignTopK, QTopK, TopK, RandK, sign, QSGD
    mem_i   = Delta_i - q_i              (parameter units)
    x       = x_last - mean_j q_j        every rank; then x_i = x_last = x

realized with one all-gather of the fixed-size sparse payloads and a scatter-add on every rank.
The memory is wiped when the learning rate changed since the last synchronization (the
authors' code wipes it at lr decays; ``wipe_memory_on_lr_change=False`` keeps it).

With ``period = 1`` it is error-compensated compressed SGD as a plain gradient hook
(gradient units, momentum in the optimizer after aggregation): ``p_i = g_i + e_i``,
``q_i = QComp(p_i)``, ``e_i = p_i - q_i``, gradient ``= mean_j q_j``.

The asynchronous variant (each worker on its own schedule) needs a parameter server and is not
offered: DDP's collectives need every rank at every synchronization.
"""

import torch
from torch.futures import Future

from ..compress.sparse import KINDS, MessagePlan, subtract_message
from ..core import HookState, PeriodicSyncOptimizer, check_choice, check_float, check_int
from ..core.layouts import LayoutCache


class QsparseLocalSGD(HookState):
    """Qsparse-local-SGD state.

    ``opt = ddp_hooks.QsparseLocalSGD("signtopk", k=1000, period=8).register(ddp, torch.optim.SGD(...))``
    returns the optimizer wrapper to step.

    Args:
        compressor: ``"signtopk"`` (the paper's choice), ``"qtopk"``, ``"topk"``, ``"randk"``,
            ``"grbs"`` (shared random elements: with ``period=1`` EF-SGD over GRBS, the CSER
            paper's baseline), ``"sign"`` (EF-signSGD) or ``"qsgd"``.
        k: elements kept per tensor, a count (int >= 1) or a fraction in (0, 1).
        period: local steps between synchronizations ``H`` (1: a plain gradient hook).
        levels: quantization levels ``s`` for ``qtopk`` / ``qsgd``, in [1, 255].
        wipe_memory_on_lr_change: zero the error memory when the learning rate changed.
        seed: seeds the per-worker generator (offset by rank) for randk and stochastic rounding,
            and the generator all ranks share for grbs.
        warmup_steps: first steps reduced by an exact fp32 all-reduce.
        process_group: the group to reduce over (default WORLD).
    """

    def __init__(
        self,
        compressor: str = "signtopk",
        k: int | float = 1000,
        period: int = 8,
        *,
        levels: int = 16,
        wipe_memory_on_lr_change: bool = True,
        seed: int = 0,
        warmup_steps: int = 0,
        process_group=None,
    ) -> None:
        self.compressor = check_choice("compressor", compressor, set(KINDS))
        if isinstance(k, float) and k < 1:
            self.k = check_float("k", k, 0.0, 1.0, low_open=True, high_open=True)
        else:
            self.k = check_int("k", k, 1)
        self.period = check_int("period", period, 1)
        self.levels = check_int("levels", levels, 1, 255)
        self.wipe_memory_on_lr_change = bool(wipe_memory_on_lr_change)
        self.seed = check_int("seed", seed, 0)
        super().__init__(process_group=process_group, warmup_steps=warmup_steps)
        self._generator = torch.Generator().manual_seed(self.seed + 1_000_003 * self.rank)
        self._shared = torch.Generator().manual_seed(self.seed)
        self._plans = LayoutCache(lambda params: MessagePlan(params, self.compressor, self.k, self.levels))
        # period 1: fp32 workspaces of a bucket (p = g + e, the decoded mean), none allocated per step
        self._workspaces = LayoutCache(lambda params: tuple(
            torch.empty(sum(t.numel() for t in params), device=params[0].device) for _ in range(2)))
        self._lr_at_sync: list[float] | None = None

    def register(self, ddp: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        """Register the hook; returns the optimizer wrapper (``optimizer`` is required)."""
        if optimizer is None:
            raise ValueError("QsparseLocalSGD steps through an optimizer wrapper: pass register(ddp, optimizer)")
        super().register(ddp, optimizer)
        if self.period > 1:
            for p in self._named.values():
                if self.memory.get("x_last", p) is None:
                    self.memory.set("x_last", p, p.detach().clone())
        return QsparseOptimizer(optimizer, self)

    # ---- the hook ---------------------------------------------------------------------------
    def reduce(self, bucket, step: int) -> Future:
        buf = bucket.buffer()
        if self.period > 1:  # local steps: nothing leaves this rank
            fut: Future = Future()
            fut.set_result(buf)
            return fut
        return self._error_compensated(bucket, step)

    def _error_compensated(self, bucket, step: int) -> Future:
        """``period = 1``: p = g + e; q = QComp(p); e = p - q; gradient = mean_j q_j."""
        params, grads, buf = bucket.parameters(), bucket.gradients(), bucket.buffer()
        plan = self._plans.get(params, step)
        p, out = self._workspaces.get(params, step)
        error = self.memory.flat("error", params)
        with self.time(step, "compress", buf.device):
            torch.add(buf, error, out=p)
            pieces = p.split([t.numel() for t in grads])
            payload, local = plan.encode(pieces, self._generator, self._shared)
        self.count_bits(step, plan.paper_bits)
        gathered = self.transport.all_gather(payload, step)

        def finish(fut: Future) -> torch.Tensor:
            with self.time(step, "decompress", buf.device):
                bad = plan.mean(fut.value(), out.split([t.numel() for t in grads]), local)
                for piece, (idx, values) in zip(pieces, local):
                    subtract_message(piece, idx, values)  # p becomes p - q_i
                torch.where(bad, error, p, out=error)
                buf.copy_(out.masked_fill_(bad, float("nan")))
            return buf

        return gathered.then(finish)

    # ---- synchronization (period > 1) -------------------------------------------------------
    def synchronize(self, step: int) -> None:
        """Delta_i = mem_i + (x_last - x_i); q_i = QComp(Delta_i); mem_i = Delta_i - q_i;
        x_i = x_last = x_last - mean_j q_j."""
        params = list(self._named.values())
        plan = self._plans.get(params, step)
        lrs = self.learning_rates(params)
        if self.wipe_memory_on_lr_change and self._lr_at_sync is not None and lrs != self._lr_at_sync:
            self.memory.clear("memory")
        self._lr_at_sync = lrs
        memory = self.memory.flat("memory", params)
        device = params[0].device
        with torch.no_grad():
            with self.time(step, "compress", device):
                last = [self.memory.get("x_last", p) for p in params]
                deltas = memory.split([p.numel() for p in params])
                for delta, x_last, p in zip(deltas, last, params):
                    delta.add_(x_last.view(-1)).sub_(p.detach().view(-1))  # mem + (x_last - x)
                payload, local = plan.encode(deltas, self._generator, self._shared)
                for delta, (idx, values) in zip(deltas, local):
                    subtract_message(delta, idx, values)  # mem = Delta - q_i
            self.count_bits(step, plan.paper_bits)
            gathered = self.transport.all_gather(payload, step).wait()
            with self.time(step, "decompress", device):
                means = [torch.empty(p.numel(), dtype=torch.float32, device=device) for p in params]
                plan.mean(gathered, means, local)
                for p, x_last, mean in zip(params, last, means):
                    x_last.view(-1).sub_(mean.to(x_last.dtype))
                    p.copy_(x_last)

    # ---- checkpoints ---------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {
            "generator": self._generator.get_state(),
            "shared": self._shared.get_state(),
            "lr_at_sync": self._lr_at_sync,
        }

    def load_extra_state(self, state: dict) -> None:
        self._generator.set_state(state["generator"])
        self._shared.set_state(state["shared"])
        self._lr_at_sync = state["lr_at_sync"]


class QsparseOptimizer(PeriodicSyncOptimizer):
    """Steps the local optimizer; with ``period > 1`` synchronizes after every ``period`` steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, hook_state: QsparseLocalSGD) -> None:
        super().__init__(optimizer, hook_state, hook_state.period if hook_state.period > 1 else 0)

    def synchronize(self, step: int) -> None:
        self.hook_state.synchronize(step)
