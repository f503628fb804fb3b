"""PowerSGD: rank-r compression by one warm-started power-iteration step, with error feedback
(Vogels, Karimireddy, Jaggi, NeurIPS 2019; docs/algorithms.md, "PowerSGD").

Per bucket, for every gradient matrix ``M_w = g_w + e_w`` chosen for compression (Algorithm 1)::

    P   = sum_w M_w Q            (all-reduce; Q is last step's Q or shared random init)
    P^  = orthogonalize(P)
    Q   = mean_w M_w^T P^        (all-reduce)
    M^  = P^ Q^T                 returned as the gradient; Q is kept for the next step
    e_w = M_w - M^               (error feedback, Algorithm 2)

Because ``P`` and ``Q`` are linear in ``M_w``, the result is exactly one power-iteration step on
the mean matrix. Vectors and matrices that would not shrink are all-reduced exactly; that
all-reduce is launched first so it overlaps the matmuls. Momentum and weight decay stay in the
optimizer, after aggregation (torch SGD after the hook). The kept ``Q`` is normalized column by
column before each use: ``P^`` does not depend on the scale of ``Q``'s columns, and a large
gradient can then never make the next ``P`` overflow.

Differences from torch's ``powerSGD_hook``: no forced warm-up (memory is per parameter, so
DDP's bucket rebuild is harmless), one batched matmul per shape group instead of per-tensor
loops, fp32 math on fp16/bf16 buckets, no device-wide synchronize, no NaN from all-zero
matrices, and the Q all-reduce goes out in bucket order on its own process group, so several
buckets in flight are safe under gloo too.
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch.futures import Future, collect_all
from typing_extensions import Unpack

from ..comm import chain
from ..compress.error_feedback import compensate, residual
from ..compress.lowrank import LowRankPlan
from ..compress.orthogonalize import METHODS, orthogonalize
from ..core import (
    SEED,
    Bucket,
    Choice,
    Flag,
    Float,
    Generators,
    HookState,
    Int,
    Runtime,
    Settings,
    nonfinite,
    poison,
    setting,
    split_flag,
    with_flag,
    write_flag,
)
from ..core.layouts import LayoutCache


class _Layout:
    """Per-layout data: the plan, the compressed parameters in plan order, and fp32
    workspaces (``M = g + e``, the new ``Q``, and ``M^`` for 16-bit buckets) so that no large
    tensor is allocated per step."""

    def __init__(self, params: list[torch.Tensor], rank: int, rate: float) -> None:
        self.plan = LowRankPlan.build([p.shape for p in params], rank, rate)
        self.compressed = [params[i] for i in self.plan.order]
        self.q_sizes = [g.m * g.rank for g in self.plan.groups for _ in range(g.size)]
        self.numels = [p.numel() for p in self.compressed]
        device = params[0].device
        self.matrices = torch.empty(sum(self.numels), device=device)
        self.queries = torch.empty(self.plan.q_numel, device=device)
        self.approx: torch.Tensor | None = None


@dataclass
class _Round:
    """One bucket's step."""

    step: int
    bucket: Bucket
    layout: _Layout
    p_flat: torch.Tensor  # P of every matrix, then the flag
    exact: torch.Tensor | None = None  # exact tensors' mean (+ the flag when nothing is compressed)


@dataclass(frozen=True, kw_only=True)
class PowerSGDSettings(Settings):
    """PowerSGD's hyper-parameters."""

    rank: int = setting(4, Int(1, 1024), "target rank ``r`` (each matrix uses ``min(n, m, r)``).")
    warm_start: bool = setting(True, Flag(), "reuse last step's ``Q`` (the paper's choice), not a fresh random one.")
    error_feedback: bool = setting(True, Flag(), "keep ``M_w - M^`` and add it to the next gradient.")
    min_compression_rate: float = setting(
        2.0, Float(1.0), "compress a matrix only if it shrinks by more than this factor."
    )
    seed: int = setting(0, SEED, "seed of the shared generator for ``Q`` (identical on every rank).")
    orthogonalization: str = setting(
        "auto",
        Choice(("auto", *METHODS)),
        '``"auto"`` is ``"qr"`` on the CPU (fastest there in ``benchmarks/powersgd.py``) and '
        '``"gram_schmidt"`` on GPUs.',
    )
    epsilon: float = setting(1e-8, Float(0.0), "added to column norms so that all-zero matrices give zeros, not NaN.")


class PowerSGD(HookState):
    """PowerSGD state and hook.

    ``state = ddp_hooks.PowerSGD(rank=4).register(ddp)``
    """

    stages = 2
    memory_slots = ("error",)
    settings_type = PowerSGDSettings
    settings: PowerSGDSettings

    def __init__(
        self,
        rank: int = 4,
        *,
        warm_start: bool = True,
        error_feedback: bool = True,
        min_compression_rate: float = 2.0,
        seed: int = 0,
        orthogonalization: str = "auto",
        epsilon: float = 1e-8,
        **runtime: Unpack[Runtime],
    ) -> None:
        settings = PowerSGDSettings.of(locals())
        super().__init__(settings, **runtime)
        self.rng = Generators(settings.seed)
        self._layouts = LayoutCache(lambda params: _Layout(params, settings.rank, settings.min_compression_rate))

    def memory_numel(self, slot: str, param: torch.Tensor) -> int | None:
        if slot == "q":
            n = param.shape[0] if param.dim() else 1
            return (param.numel() // max(n, 1)) * min(n, param.numel() // max(n, 1), self.settings.rank)
        return super().memory_numel(slot, param)

    def _method(self, device: torch.device) -> str:
        if self.settings.orthogonalization != "auto":
            return self.settings.orthogonalization
        return "qr" if device.type == "cpu" else "gram_schmidt"

    def _queries(self, layout: _Layout) -> torch.Tensor:
        """The kept Q of a layout, each column normalized; new (or, without warm start, all)
        pieces drawn from the shared generator in bucket order, identically on every rank."""
        fresh = (
            self.memory.missing("q", layout.compressed) if self.settings.warm_start else range(len(layout.compressed))
        )
        flat = self.memory.flat("q", layout.compressed, sizes=layout.q_sizes)
        if fresh:
            pieces = flat.split(layout.q_sizes)
            for i in fresh:
                pieces[i].copy_(torch.randn(layout.q_sizes[i], generator=self.rng.shared))
        for qt in layout.plan.q_views(flat):  # (size, rank, m): unit columns of Q
            qt.div_(torch.linalg.vector_norm(qt, dim=-1, keepdim=True).clamp_min_(1e-30))
        return flat

    # ---- the algorithm ------------------------------------------------------------------------
    def reduce(self, bucket: Bucket, step: int) -> Future[torch.Tensor]:
        layout = self._layouts.get(bucket.params, step)
        r = _Round(step, bucket, layout, torch.empty(layout.plan.p_numel + 1, device=bucket.buffer.device))
        bad = nonfinite(bucket.buffer)
        plan = layout.plan
        exact_bits = 32 * sum(bucket.params[i].numel() for i in plan.exact)
        self.count_bits(step, exact_bits + 32 * sum(g.size * (g.n + g.m) * g.rank for g in plan.groups))
        exact_fut = self._send_exact(r, bad if not plan.groups else None)
        if not layout.plan.groups:
            assert exact_fut is not None  # it carries the flag
            return chain(exact_fut, lambda _: self._finish(r))
        with self.time(step, "compress", bucket.buffer.device):
            self._project_p(r, bad)
        p_fut = self.transport.all_reduce(r.p_flat, step)
        q_fut = self.transport.then(p_fut, 1, lambda _: self._project_q(r))
        waits = [q_fut] if exact_fut is None else [exact_fut, q_fut]
        return chain(collect_all(waits), lambda done: ([f.value() for f in done], self._finish(r))[1])

    def _send_exact(self, r: _Round, bad: torch.Tensor | None) -> Future[torch.Tensor] | None:
        """All-reduce the mean of the tensors sent exactly (launched first, to overlap), with
        the flag at its tail when nothing is compressed (``bad`` given)."""
        plan, grads = r.layout.plan, r.bucket.grads()
        if not plan.exact and bad is None:
            return None
        pieces = [grads[i].reshape(-1).float() for i in plan.exact]
        r.exact = (torch.cat(pieces) if bad is None else with_flag(pieces, bad)).mul_(1.0 / self.world_size)
        return self.transport.all_reduce(r.exact, r.step)

    def _project_p(self, r: _Round, bad: torch.Tensor) -> None:
        """M = g + e (one pass per tensor); P = M Q; the flag rides at the end of P."""
        layout, grads = r.layout, r.bucket.grads()
        local = [grads[i].reshape(-1) for i in layout.plan.order]
        pieces = layout.matrices.split(layout.numels)
        if self.settings.error_feedback:
            error = self.memory.flat("error", layout.compressed)
            for g, e, m in zip(local, error.split(layout.numels), pieces):
                compensate(g, e, out=m)
        else:
            for g, m in zip(local, pieces):
                m.copy_(g)
        queries = self._queries(layout)
        plan = layout.plan
        for m, qt, p in zip(plan.m_views(layout.matrices), plan.q_views(queries), plan.p_views(r.p_flat)):
            torch.bmm(m, qt.transpose(1, 2), out=p)
        write_flag(r.p_flat, bad)

    def _project_q(self, r: _Round) -> Future[torch.Tensor]:
        """P^ = orthogonalize(P); Q^T = P^T M; all-reduce the new Q (stage 1)."""
        plan, device = r.layout.plan, r.layout.matrices.device
        with self.time(r.step, "compress", device):
            method = self._method(device)
            for p in plan.p_views(r.p_flat):
                orthogonalize(p, method, self.settings.epsilon)
            for m, p, qt in zip(
                plan.m_views(r.layout.matrices), plan.p_views(r.p_flat), plan.q_views(r.layout.queries)
            ):
                torch.bmm(p.transpose(1, 2), m, out=qt)
        return self.transport.all_reduce(r.layout.queries, r.step, stage=1)

    def _finish(self, r: _Round) -> torch.Tensor:
        """Write every gradient; keep Q and the error only if every rank's bucket was finite."""
        layout, buf, grads = r.layout, r.bucket.buffer, r.bucket.grads()
        with self.time(r.step, "decompress", buf.device):
            _, bad = split_flag(r.p_flat if layout.plan.groups or r.exact is None else r.exact)
            if r.exact is not None:
                sizes = [grads[i].numel() for i in layout.plan.exact]
                for i, piece in zip(layout.plan.exact, r.exact[: sum(sizes)].split(sizes)):
                    grads[i].copy_(piece.view_as(grads[i]))
            if layout.plan.groups:
                self._decompress(r, bad)
            return poison(buf, bad)

    def _decompress(self, r: _Round, bad: torch.Tensor) -> None:
        """M^ = P^ Q^T into each gradient; e = M - M^; commit Q and e unless ``bad``."""
        layout, grads = r.layout, r.bucket.grads()
        plan, queries = layout.plan, layout.queries.div_(self.world_size)
        layout.queries = self.memory.commit("q", layout.compressed, queries, unless=bad)
        if r.bucket.buffer.dtype == torch.float32:
            for g, p, qt in zip(plan.groups, plan.p_views(r.p_flat), plan.q_views(queries)):
                for k, i in enumerate(g.members):
                    torch.mm(p[k], qt[k], out=grads[i].view(g.n, g.m))
            approx = [grads[i].reshape(-1) for i in plan.order]
        else:
            if layout.approx is None:
                layout.approx = torch.empty_like(layout.matrices)
            for m_hat, p, qt in zip(plan.m_views(layout.approx), plan.p_views(r.p_flat), plan.q_views(queries)):
                torch.bmm(p, qt, out=m_hat)
            approx = list(layout.approx.split(layout.numels))
            for i, piece in zip(plan.order, approx):
                grads[i].copy_(piece.view_as(grads[i]))
        if self.settings.error_feedback:
            for m, m_hat in zip(layout.matrices.split(layout.numels), approx):
                residual(m, m_hat)
            layout.matrices = self.memory.commit("error", layout.compressed, layout.matrices, unless=bad)

    # ---- checkpoints ---------------------------------------------------------------------------
    def extra_state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.state_dict()}

    def extra_problems(self, extra: Any) -> list[str]:
        return Generators.problems(extra.get("rng"))

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.load_state_dict(state["rng"])
        self._layouts.clear()
