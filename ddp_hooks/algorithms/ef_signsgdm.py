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
from typing_extensions import Unpack

from ..comm import chain
from ..compress import scaled_sign as sign
from ..compress.scaled_sign import SignMessage
from ..compress.sign_worker import Momentum, worker_message
from ..core import Bucket, Choice, Flag, Float, HookState, Int, Maybe, Runtime, Settings, setting
from ..core.flags import keep_unless, nonfinite, poison
from ..core.layouts import LayoutCache
from .ef_shards import ShardPlan, Workspace, assign_owners, param_pieces


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


@dataclass(frozen=True, kw_only=True)
class EFSignSGDMSettings(Settings):
    """dist-EF-SGDM's hyper-parameters."""

    momentum: float = setting(0.9, Float(0.0, 1.0, high_open=True), "worker momentum ``mu``; 0 gives dist-EF-SGD.")
    nesterov: bool = setting(True, Flag(), "use the Nesterov look-ahead ``g + mu * m`` (the paper's choice).")
    block_size: int | None = setting(
        None, Maybe(Int(1)), "worker blocks of this many elements in each tensor (None: one block per tensor)."
    )
    topology: str = setting(
        "sharded",
        Choice(("sharded", "allgather")),
        '``"sharded"``: rank ``j`` serves shard ``j`` of every bucket (bytes per worker do not grow with '
        'the world size); ``"allgather"``: every rank runs every shard\'s server step (same results).',
    )


class EFSignSGDM(HookState):
    """dist-EF-SGDM state and hook.

    ``state = ddp_hooks.EFSignSGDM(momentum=0.9).register(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1))``

    The learning rate is read from the optimizer it follows (warm-up schedules included); that
    optimizer must not apply momentum itself.
    """

    memory_slots = ("error", "server_error", "momentum")
    settings_type = EFSignSGDMSettings
    settings: EFSignSGDMSettings

    def __init__(
        self,
        momentum: float = 0.9,
        *,
        nesterov: bool = True,
        block_size: int | None = None,
        topology: str = "sharded",
        **runtime: Unpack[Runtime],
    ) -> None:
        settings = EFSignSGDMSettings.of(locals())
        self.stages = 2 if settings.topology == "sharded" else 1
        super().__init__(settings, **runtime)
        self._plans = LayoutCache(self._build_plan)
        self._how = Momentum(self.settings.momentum, self.settings.nesterov)
        self._lr_prev: dict[int, float] = {}
        self._owners: dict[int, list[int]] = {}

    def _build_plan(self, params: list[torch.Tensor]) -> tuple[ShardPlan, Workspace]:
        owners = [self._owners_of(p) for p in params]
        plan = ShardPlan.build(
            [p.numel() for p in params], owners, self.settings.block_size, self.world_size, params[0].device
        )
        return plan, Workspace(plan, params[0].dtype, self._owned(params))

    def on_attach(self) -> None:
        params = self.model_view().params
        owners = assign_owners([p.numel() for p in params], self.settings.block_size, self.world_size)
        self._owners = {id(p): mine for p, mine in zip(params, owners)}

    def _owners_of(self, param: torch.Tensor) -> list[int]:
        """The rank serving each server piece of ``param``, fixed by the model's parameters
        (without a model view, by the parameter alone)."""
        mine = self._owners.get(id(param))
        return (
            mine if mine is not None else assign_owners([param.numel()], self.settings.block_size, self.world_size)[0]
        )

    def _owned(self, params: list[torch.Tensor]) -> list[int]:
        """This rank's server elements of each parameter (the sharded server error's sizes)."""
        out = []
        for p in params:
            cuts = param_pieces(p.numel(), self.settings.block_size)
            out.append(sum(b - a for (a, b), j in zip(cuts, self._owners_of(p)) if j == self.rank))
        return out

    def memory_numel(self, slot: str, param: torch.Tensor) -> int | None:
        if slot == "server_error" and self.settings.topology == "sharded":
            return self._owned([param])[0]
        return super().memory_numel(slot, param)

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
        out = buf if buf.dtype == torch.float32 else ws.out
        r = _Round(step, bucket, plan, ws, self._rho(params), out)
        with self.time(step, "compress", buf.device):
            packed, bad = self._worker(r)
        self.count_bits(step, plan.numel + 32 * len(plan.blocks.blocks))
        if self.settings.topology == "allgather":
            whole = SignMessage(plan.numel, len(plan.blocks.blocks))
            assert r.scales is not None  # set by _worker
            gathered = self.transport.all_gather(whole.pack(packed, r.scales, bad), step)
            return chain(gathered, lambda rows: self._serve_all(r, rows))
        assert r.scales is not None
        requests = plan.requests(packed, r.scales, bad)
        replies = self.transport.through_owners(requests, lambda rows: self._serve(r, self.rank, rows), step)
        return chain(replies, lambda replies: self._finish(r, replies))

    def _worker(self, r: _Round) -> tuple[torch.Tensor, torch.Tensor]:
        """m' = mu m + g; v = g + mu m' (or m') + rho e; C(v) over the worker blocks; the new
        error v - C(v). Returns the packed signs of the bucket and its non-finite flag."""
        params = r.bucket.params
        g = r.bucket.buffer if r.bucket.buffer.dtype == torch.float32 else r.bucket.buffer.float()
        momentum = self.memory.flat("momentum", params) if self.settings.momentum > 0 else None
        memories = (momentum, self.memory.flat("error", params))
        packed, r.scales = worker_message(g, memories, self._how, r.rho, r.plan.blocks, r.ws.worker)
        return packed, nonfinite(g)

    def _serve(self, r: _Round, j: int, rows: torch.Tensor) -> torch.Tensor:
        """Server step on owner ``j``'s pieces, in its row coordinates, from the workers' rows:
        p = mean_i Delta_i + rho e_srv; Delta = C(p) over the pieces (padding stays 0);
        e_srv = p - Delta. Returns the reply (the rows' byte layout)."""
        plan, msg, row, ws = r.plan, r.plan.message, r.plan.rows[j], r.ws
        bad = msg.any_bad(rows)
        if not row.segments:
            return msg.pack(rows.new_zeros(0), rows.new_zeros(0, dtype=torch.float32), bad)
        count = row.count
        mean, error, residual = ws.mean[:count], ws.error[:count], ws.server[:count]
        scales = plan.row_scales(j, msg.scales(rows))
        sign.average(msg.signs(rows)[:, : count // 8], scales, row.pieces, mean)
        stored = self.memory.flat("server_error", r.bucket.params, ws.owned)
        rho = _to_row(row.segments, r.rho, ws.rho[:count]) if torch.is_tensor(r.rho) else r.rho
        _to_row([(a, c, n) for a, c, n in _compact(row.segments)], stored, error)
        packed, piece_scales = sign.compress_ef(mean, error, rho, row.pieces, residual)
        real = piece_scales[row.real]
        bad = bad | ~torch.isfinite(real).all()
        candidate = ws.mean[: stored.numel()]  # the mean is no longer needed
        for at, c, n in _compact(row.segments):
            candidate[c : c + n].copy_(residual[at : at + n])
        keep_unless(bad, stored, candidate)
        return msg.pack(packed, real.masked_fill(bad, float("nan")), bad)

    def _serve_all(self, r: _Round, gathered: torch.Tensor) -> torch.Tensor:
        """Every owner's server step on this rank, over the whole bucket, from every worker's
        whole message (the same floats as the sharded topology)."""
        plan, ws = r.plan, r.ws
        whole = SignMessage(plan.numel, len(plan.blocks.blocks))
        mean = ws.mean[: plan.numel]
        sign.average(whole.signs(gathered), whole.scales(gathered), plan.blocks, mean)
        bad = whole.any_bad(gathered)
        error, residual = self.memory.flat("server_error", r.bucket.params), ws.server[: plan.numel]
        packed, scales = sign.compress_ef(mean, error, r.rho, plan.pieces, residual)
        bad = bad | ~torch.isfinite(scales).all()
        keep_unless(bad, error, residual)
        return self._decoded(r, packed, scales, bad)

    def _finish(self, r: _Round, replies: torch.Tensor) -> torch.Tensor:
        """Every owner's reply back into the bucket's bit and piece order, then decoded."""
        with self.time(r.step, "decompress", r.bucket.buffer.device):
            packed = r.plan.gather_replies(replies, r.ws.packed)
            scales = r.plan.reply_piece_scales(replies)
            bad = r.plan.message.any_bad(replies)
        return self._decoded(r, packed, scales, bad)

    def _decoded(self, r: _Round, packed: torch.Tensor, scales: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
        """Delta into the bucket; the worker memories take the step only if every worker's
        bucket (and the server's step) was finite."""
        params, buf = r.bucket.params, r.bucket.buffer
        with self.time(r.step, "decompress", buf.device):
            if r.plan.numel:
                sign.decode(packed, scales, list(r.plan.pieces.blocks), r.out)
            worker = r.ws.worker
            worker.error = self.memory.commit("error", params, worker.error, unless=bad)
            if self.settings.momentum > 0:
                worker.momentum = self.memory.commit("momentum", params, worker.momentum, unless=bad)
            if r.out is not buf:
                buf.copy_(r.out)
            return poison(buf, bad)

    # ---- checkpoints ---------------------------------------------------------------------------
    def extra_state_dict(self) -> dict[str, Any]:
        names = self.model_view().names
        return {"lr_prev": {names[i]: lr for i, lr in self._lr_prev.items()}}

    def extra_problems(self, extra: Any) -> list[str]:
        lr_prev = extra.get("lr_prev")
        named = self.model_view().named
        if not isinstance(lr_prev, dict) or any(
            n not in named or isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0
            for n, v in lr_prev.items()
        ):
            return ["extra['lr_prev'] must map parameter names to learning rates >= 0"]
        return []

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        named = self.model_view().named
        self._lr_prev = {id(named[n]): float(lr) for n, lr in state["lr_prev"].items()}
        self._plans.clear()


def _compact(segments: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(row position, position in the owner's compact memory, length) of each run."""
    out, c = [], 0
    for at, _, n in segments:
        out.append((at, c, n))
        c += n
    return out


def _to_row(segments: list[tuple[int, int, int]], source: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """``row`` (zeroed) holding ``source[src : src + n]`` at each run's row position ``at``, for
    segments (at, src, n)."""
    row.zero_()
    for at, src, n in segments:
        row[at : at + n].copy_(source[src : src + n])
    return row
