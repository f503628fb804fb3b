"""dist-EF-SGDM: blockwise scaled sign with worker and server error feedback, Nesterov momentum,
two-way compression (Zheng, Huang, Kwok, NeurIPS 2019; docs/algorithms.md, "dist-EF-SGDM").

Per step, in gradient units, with ``rho = lr_{t-1} / lr_t``::

    worker i:  m_i = mu * m_i + g_i
               p_i = g_i + mu * m_i + rho * e_i        (Nesterov; p_i = m_i + rho * e_i without)
               Delta_i = C(p_i) ;  e_i = p_i - Delta_i  C = blockwise scaled sign
    server:    p = mean_i Delta_i + rho * e_srv
               Delta = C(p) ;  e_srv = p - Delta       (C over the server pieces, .ef_shards)
    returned:  Delta (the optimizer steps x -= lr * (Delta + weight_decay * x))

Weight decay stays out of the compressed path: the optimizer applies it after the hook (plain
``torch.optim.SGD(params, lr, weight_decay=...)`` with ``momentum=0``; the hook already applies
momentum). ``momentum=0`` gives dist-EF-SGD.

Topologies (identical results): ``"sharded"`` (default) makes rank ``j`` the server of shard
``j`` of every bucket (all-to-all to the owners, then all-gather of their replies: bytes per
worker do not grow with the world size); ``"allgather"`` gathers every worker's message and
runs every shard's server step on every rank.

Non-finite gradients: a worker whose bucket holds inf/NaN flags it in its message; every rank
then returns NaN for the bucket (``GradScaler`` skips the step) and no memory takes it in.
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch.futures import Future

from ..comm import chain
from ..compress import scaled_sign as sign
from ..compress.error_feedback import Momentum, worker_message
from ..compress.scaled_sign import SignMessage
from ..core import Bucket, HookState, check_bool, check_choice, check_float, check_int, keep_unless, nonfinite, poison
from ..core.layouts import LayoutCache
from .ef_shards import ShardPlan, Workspace


@dataclass
class _Round:
    """One bucket's step: what the worker computed, and where the result goes."""

    step: int
    bucket: Bucket
    plan: ShardPlan
    ws: Workspace
    rho: float | torch.Tensor
    out: torch.Tensor  # fp32 destination of Delta (the bucket itself when it is fp32)
    scales: torch.Tensor | None = None  # the worker's block scales


class EFSignSGDM(HookState):
    """dist-EF-SGDM state and hook.

    ``state = ddp_hooks.EFSignSGDM(momentum=0.9).register(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1))``

    Args:
        momentum: worker momentum ``mu`` in [0, 1); 0 gives dist-EF-SGD.
        nesterov: use the Nesterov look-ahead ``g + mu * m`` (the paper's choice).
        block_size: worker blocks of this many elements within each parameter tensor; ``None``
            (the default) gives one block per parameter tensor.
        topology: ``"sharded"`` or ``"allgather"`` (see the module docstring).
        warmup_steps: first steps reduced by an exact fp32 all-reduce.
        process_group: the group to reduce over (default: the default group).
        node_size: ranks per node for the node-aware mode (exact inside a node, this
            algorithm between nodes; ``"auto"``: torchrun's ``LOCAL_WORLD_SIZE``).

    The learning rate is read from the optimizer it follows (warm-up schedules included); that
    optimizer must not apply momentum itself.
    """

    memory_slots = ("error", "server_error", "momentum")

    def __init__(
        self,
        momentum: float = 0.9,
        *,
        nesterov: bool = True,
        block_size: int | None = None,
        topology: str = "sharded",
        warmup_steps: int = 0,
        process_group: Any = None,
        node_size: int | str | None = None,
    ) -> None:
        self.momentum = check_float("momentum", momentum, 0.0, 1.0, high_open=True)
        self.nesterov = check_bool("nesterov", nesterov)
        self.block_size = None if block_size is None else check_int("block_size", block_size, 1)
        self.topology = check_choice("topology", topology, {"sharded", "allgather"})
        self.stages = 2 if topology == "sharded" else 1
        super().__init__(process_group=process_group, warmup_steps=warmup_steps, node_size=node_size)
        self._plans = LayoutCache(self._build_plan)
        self._how = Momentum(self.momentum, self.nesterov)
        self._lr_prev: dict[int, float] = {}

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "block_size": self.block_size,
            "topology": self.topology,
        }

    def _build_plan(self, params: list[torch.Tensor]) -> tuple[ShardPlan, Workspace]:
        plan = ShardPlan.build([p.numel() for p in params], self.block_size, self.world_size, params[0].device)
        return plan, Workspace(plan, params[0].dtype)

    # ---- the optimizer ----------------------------------------------------------------------
    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            if group.get("momentum", 0) or "betas" in group:
                raise ValueError(
                    "EFSignSGDM applies momentum inside the hook (worker momentum before "
                    "compression); an optimizer that applies momentum too would apply it twice. "
                    "Use torch.optim.SGD(params, lr=..., momentum=0, weight_decay=...) and set "
                    "the momentum on EFSignSGDM(momentum=...) (Hugging Face Trainer: "
                    'TrainingArguments(optim="sgd"))'
                )

    def after_step(self) -> None:
        """Remember the learning rate each parameter was just stepped with."""
        params = self.model_view().params if self._model is not None else []
        for p, lr in zip(params, self.learning_rates(params)):
            self._lr_prev[id(p)] = lr

    def _rho(self, params: list[torch.Tensor]) -> float | torch.Tensor:
        """``lr_{t-1} / lr_t`` per parameter: a float, or a per-element tensor when they differ."""
        if not self._lr_prev:
            return 1.0  # nothing stepped yet: the error memories are zero
        rhos = []
        for p, lr in zip(params, self.learning_rates(params)):
            prev = self._lr_prev.get(id(p))
            # after a step at lr 0 the error is 0 in parameter units, so rho = 0; at lr 0 now
            # nothing moves whatever rho is, so keep the memory as it is (1)
            rhos.append(prev / lr if prev is not None and lr > 0 else 1.0)
        if all(r == rhos[0] for r in rhos):
            return rhos[0]
        device = params[0].device  # filled on the device: no host-to-device copy, no sync
        return torch.cat([torch.full((p.numel(),), r, device=device) for p, r in zip(params, rhos)])

    # ---- the algorithm ------------------------------------------------------------------------
    def reduce(self, bucket: Bucket, step: int) -> Future[torch.Tensor]:
        params, buf = bucket.params, bucket.buffer
        plan, ws = self._plans.get(params, step)
        # the same decision on every rank: every rank keeps server error for the whole bucket
        repair = self.topology == "sharded" and self.memory.needs_assembly("server_error", params)
        self.memory.flat("server_error", params)
        out = buf if buf.dtype == torch.float32 else ws.out
        r = _Round(step, bucket, plan, ws, self._rho(params), out)
        with self.time(step, "compress", buf.device):
            message = self._worker(r)
        self.count_bits(step, plan.numel + 32 * len(plan.blocks.blocks))
        if self.topology == "allgather":
            gathered = self.transport.all_gather(message, step)
            return chain(gathered, lambda rows: self._finish(r, self._serve_all(r, rows)))
        received = self.transport.all_to_all(self._rows(r, message), step)
        if repair:
            received = self._repair(r, received)
        replies = self.transport.then(
            received, 1, lambda rows: self.transport.all_gather(self._serve(r, self.rank, rows), step, stage=1)
        )
        return chain(replies, lambda replies: self._finish(r, replies))

    def _worker(self, r: _Round) -> torch.Tensor:
        """m' = mu m + g; v = g + mu m' (or m') + rho e; C(v) over the worker blocks; the new
        error v - C(v). Returns ``[packed signs of the bucket | block scales | flag]``."""
        params, plan = r.bucket.params, r.plan
        g = r.bucket.buffer if r.bucket.buffer.dtype == torch.float32 else r.bucket.buffer.float()
        momentum = self.memory.flat("momentum", params) if self.momentum > 0 else None
        memories = (momentum, self.memory.flat("error", params))
        packed, scales = worker_message(g, memories, self._how, r.rho, plan.blocks, r.ws.worker)
        r.scales = scales
        whole = SignMessage(plan.numel, len(plan.blocks.blocks))
        return whole.pack(packed, scales, nonfinite(g))

    def _rows(self, r: _Round, message: torch.Tensor) -> torch.Tensor:
        """The worker's row for each shard's owner: the bytes of that shard's signs, one scale per
        row piece, the flag."""
        plan = r.plan
        whole = SignMessage(plan.numel, len(plan.blocks.blocks))
        packed, bad = whole.signs(message), whole.any_bad(message)
        assert r.scales is not None  # set by _worker
        piece_scales = plan.piece_scales(r.scales)
        return torch.stack([plan.message.pack(plan.signs_of(j, packed), piece_scales[j], bad) for j in range(plan.n)])

    def _repair(self, r: _Round, received: Future[Any]) -> Future[Any]:
        """A new bucket layout: this rank's new shard's server error may have been owned by
        another rank; every rank holds zeros outside its old shard, so one sum restores it."""
        server_error = self.memory.flat("server_error", r.bucket.params)
        summed = self.transport.all_reduce(server_error, r.step)

        def keep_own(_: Any) -> None:
            s = r.plan.shard(self.rank)
            server_error[: s.start].zero_()
            server_error[s.stop :].zero_()

        both = torch.futures.collect_all([chain(summed, keep_own), received])
        return chain(both, lambda f: (f[0].value(), f[1].value())[1])

    def _serve(self, r: _Round, j: int, rows: torch.Tensor) -> torch.Tensor:
        """Server step on shard ``j`` from the workers' rows: p = mean_i Delta_i + rho e_srv;
        Delta = C(p) over the pieces; e_srv = p - Delta. Returns the reply."""
        plan, msg = r.plan, r.plan.message
        off, s = plan.offset(j), plan.shard(j)
        mean = r.ws.mean[: off + s.stop - s.start]
        if plan.pieces[j].blocks:
            sign.average(msg.signs(rows), msg.scales(rows), plan.row_pieces[j], mean)
        return self._server_step(r, j, mean[off:], msg.any_bad(rows))

    def _server_step(self, r: _Round, j: int, mean: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
        """``p = mean + rho e_srv`` on shard ``j`` (``mean`` is overwritten), compressed by pieces."""
        plan, reply = r.plan, r.plan.reply
        s, pieces = plan.shard(j), plan.pieces[j]
        if not pieces.blocks:
            return reply.pack(mean.new_zeros(0, dtype=torch.uint8), mean.new_zeros(0), bad)
        error = self.memory.flat("server_error", r.bucket.params)[s]
        rho = r.rho[s] if torch.is_tensor(r.rho) else r.rho
        residual = r.ws.server[: s.stop - s.start]
        packed, scales = sign.compress_ef(mean, error, rho, pieces, residual)
        bad = bad | ~torch.isfinite(scales).all()
        keep_unless(bad, error, residual)
        return reply.pack(packed, scales.masked_fill(bad, float("nan")), bad)

    def _serve_all(self, r: _Round, gathered: torch.Tensor) -> torch.Tensor:
        """Every shard's server step on this rank, from every worker's whole message."""
        plan = r.plan
        whole = SignMessage(plan.numel, len(plan.blocks.blocks))
        mean = r.ws.mean[: plan.numel]
        sign.average(whole.signs(gathered), whole.scales(gathered), plan.blocks, mean)
        bad = whole.any_bad(gathered)
        return torch.stack([self._server_step(r, j, mean[plan.shard(j)], bad) for j in range(plan.n)])

    def _finish(self, r: _Round, replies: torch.Tensor) -> torch.Tensor:
        """Decode every shard's reply into the bucket; the worker memories take the step only
        if every worker's bucket was finite."""
        plan, reply, params, buf = r.plan, r.plan.reply, r.bucket.params, r.bucket.buffer
        with self.time(r.step, "decompress", buf.device):
            signs, scales = reply.signs(replies), reply.scales(replies)
            for j in range(plan.n):
                if plan.pieces[j].blocks:
                    sign.decode(signs[j], scales[j], list(plan.pieces[j].blocks), r.out[plan.shard(j)])
            ok = ~reply.any_bad(replies)
            worker = r.ws.worker
            worker.error = self.memory.commit("error", params, worker.error, ok)
            if self.momentum > 0:
                worker.momentum = self.memory.commit("momentum", params, worker.momentum, ok)
            if r.out is not buf:
                buf.copy_(r.out)
            return poison(buf, ~ok)

    # ---- checkpoints ---------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        names = self.model_view().names
        return {"lr_prev": {names[i]: lr for i, lr in self._lr_prev.items()}}

    def check_extra(self, extra: Any) -> list[str]:
        lr_prev = extra.get("lr_prev")
        named = self.model_view().named
        if not isinstance(lr_prev, dict) or any(
            n not in named or isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0
            for n, v in lr_prev.items()
        ):
            return ["extra['lr_prev'] must map parameter names to learning rates >= 0"]
        return []

    def load_extra_state(self, state: dict[str, Any]) -> None:
        named = self.model_view().named
        self._lr_prev = {id(named[n]): float(lr) for n, lr in state["lr_prev"].items()}
        self._plans.clear()
