"""PowerSGD: rank-r compression by one warm-started power-iteration step, with error feedback
(Vogels, Karimireddy, Jaggi, NeurIPS 2019; ALGORITHMS.md section 4).

Per bucket, for every gradient matrix ``M_w = g_w + e_w`` chosen for compression (Algorithm 1)::

    P   = sum_w M_w Q            (all-reduce; Q is last step's Q or shared random init)
    P^  = orthogonalize(P)
    Q   = mean_w M_w^T P^        (all-reduce)
    M^  = P^ Q^T                 returned as the gradient; Q is kept for the next step
    e_w = M_w - M^               (error feedback, Algorithm 2)

Because ``P`` and ``Q`` are linear in ``M_w``, the result is exactly one power-iteration step on
the mean matrix. Vectors and matrices that would not shrink are all-reduced exactly; that
all-reduce is launched first so it overlaps the matmuls. Momentum and weight decay stay in the
optimizer, after aggregation (torch SGD after the hook).

Differences from torch's ``powerSGD_hook``: no forced warm-up (memory is per parameter, so
DDP's bucket rebuild is harmless), one batched matmul per shape group instead of per-tensor
loops, fp32 math on fp16/bf16 buckets, no device-wide synchronize, no NaN from all-zero
matrices, and the Q all-reduce goes out in bucket order on its own process group, so several
buckets in flight are safe under gloo too.
"""

import torch
from torch.futures import Future, collect_all

from ..compress.lowrank import LowRankPlan
from ..compress.orthogonalize import METHODS, orthogonalize
from ..core import HookState, check_choice, check_float, check_int
from ..core.layouts import LayoutCache


class _Bucket:
    """Per-layout data: the plan, the parameters in plan order, and fp32 workspaces (``M = g + e``,
    and ``M^`` for 16-bit buckets; fp32 buckets take ``M^`` directly) so that no large tensor is
    allocated per step."""

    def __init__(self, params, rank, rate):
        self.plan = LowRankPlan.build([p.shape for p in params], rank, rate)
        self.compressed = [params[i] for i in self.plan.order]
        self.q_sizes = []
        for g in self.plan.groups:
            self.q_sizes += [g.m * g.rank] * g.size
        numel = sum(p.numel() for p in self.compressed)
        device = params[0].device
        self.matrices = torch.empty(numel, dtype=torch.float32, device=device)
        self.approx: torch.Tensor | None = None  # fp32 M^, only for 16-bit buckets
        self.queries = torch.empty(self.plan.q_numel, dtype=torch.float32, device=device)  # new Q
        self.numels = [p.numel() for p in self.compressed]


class PowerSGD(HookState):
    """PowerSGD state and hook.

    ``state = ddp_hooks.PowerSGD(rank=4).register(ddp)``

    Args:
        rank: target rank ``r`` (each matrix uses ``min(n, m, r)``), at least 1.
        warm_start: reuse last step's ``Q`` (the paper's choice) instead of a fresh random one.
        error_feedback: keep ``M_w - M^`` and add it to the next gradient.
        min_compression_rate: compress a matrix only if it shrinks by more than this factor.
        warmup_steps: first steps reduced by an exact fp32 all-reduce (0 is fine).
        seed: seed of the shared generator for ``Q`` (identical on every rank).
        orthogonalization: ``"gram_schmidt"``, ``"cholesky_qr2"``, ``"qr"``, or ``"auto"``:
            ``"qr"`` on the CPU (fastest there in ``benchmarks/powersgd.py``) and
            ``"gram_schmidt"`` on GPUs.
        epsilon: added to column norms so that all-zero matrices give zeros, not NaN.
        process_group: the group to reduce over (default WORLD).
    """

    stages = 2

    def __init__(
        self,
        rank: int = 4,
        *,
        warm_start: bool = True,
        error_feedback: bool = True,
        min_compression_rate: float = 2.0,
        warmup_steps: int = 0,
        seed: int = 0,
        orthogonalization: str = "auto",
        epsilon: float = 1e-8,
        process_group=None,
    ) -> None:
        self.matrix_rank = check_int("rank", rank, 1)
        self.warm_start = bool(warm_start)
        self.error_feedback = bool(error_feedback)
        self.min_compression_rate = check_float("min_compression_rate", min_compression_rate, 1.0)
        self.seed = check_int("seed", seed, 0)
        self.orthogonalization = check_choice("orthogonalization", orthogonalization, {"auto", *METHODS})
        self.epsilon = check_float("epsilon", epsilon, 0.0)
        super().__init__(process_group=process_group, warmup_steps=warmup_steps)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._buckets = LayoutCache(lambda params: _Bucket(params, self.matrix_rank, self.min_compression_rate))

    def _method(self, device: torch.device) -> str:
        if self.orthogonalization != "auto":
            return self.orthogonalization
        return "qr" if device.type == "cpu" else "gram_schmidt"

    def _queries(self, b: _Bucket, device) -> torch.Tensor:
        """The flat Q buffer of a bucket; new (or, without warm start, all) pieces drawn from
        the shared generator in bucket order, identically on every rank."""
        fresh = self.memory.missing("q", b.compressed) if self.warm_start else range(len(b.compressed))
        flat = self.memory.flat("q", b.compressed, sizes=b.q_sizes)
        if fresh:
            pieces = flat.split(b.q_sizes)
            for i in fresh:
                pieces[i].copy_(torch.randn(b.q_sizes[i], generator=self._generator))
        return flat

    def reduce(self, bucket, step: int) -> Future:
        params, grads, buf = bucket.parameters(), bucket.gradients(), bucket.buffer()
        device, n = buf.device, self.world_size
        b = self._buckets.get(params, step)
        plan = b.plan

        exact_fut, exact_buf = None, None
        if plan.exact:
            # launched first, so that it overlaps the matmuls below
            exact_buf = torch.cat([grads[i].reshape(-1) for i in plan.exact]).mul_(1.0 / n)
            exact_fut = self.transport.all_reduce(exact_buf, step)
        bits = 32 * sum(grads[i].numel() for i in plan.exact)
        bits += 32 * sum(g.size * (g.n + g.m) * g.rank for g in plan.groups)
        self.count_bits(step, bits)

        def write_exact() -> None:
            for i, piece in zip(plan.exact, exact_buf.split([grads[i].numel() for i in plan.exact])):
                grads[i].copy_(piece.view_as(grads[i]))

        if not plan.groups:
            return exact_fut.then(lambda f: (write_exact(), buf)[1])

        with self.time(step, "compress", device):
            local = [grads[i].reshape(-1) for i in plan.order]
            matrices = b.matrices
            m_pieces = matrices.split(b.numels)
            if self.error_feedback:
                error = self.memory.flat("error", b.compressed)
                for g, e, m in zip(local, error.split(b.numels), m_pieces):
                    torch.add(g, e, out=m)  # M = g + e, one pass per tensor
            elif buf.dtype == torch.float32:
                torch.cat(local, out=matrices)
            else:
                matrices.copy_(torch.cat(local))
            ms = plan.m_views(matrices)
            q_flat = self._queries(b, device)
            qts = plan.q_views(q_flat)
            q_new = b.queries  # the new Q goes here; it replaces q_flat only if the step is finite
            new_qts = plan.q_views(q_new)
            p_flat = torch.empty(plan.p_numel, dtype=torch.float32, device=device)
            ps = plan.p_views(p_flat)
            for m, qt, p in zip(ms, qts, ps):
                torch.bmm(m, qt.transpose(1, 2), out=p)  # P = M Q
        p_fut = self.transport.all_reduce(p_flat, step)
        method = self._method(device)

        def project(_) -> Future:
            with self.time(step, "compress", device):
                for p in ps:
                    orthogonalize(p, method, self.epsilon)
                for m, p, qt in zip(ms, ps, new_qts):
                    torch.bmm(p.transpose(1, 2), m, out=qt)  # Q^T = P^T M
            return self.transport.all_reduce(q_new, step, stage=1)

        q_fut = self.transport.then(p_fut, 1, project)

        def finish(_) -> torch.Tensor:
            with self.time(step, "decompress", device):
                q_new.div_(n)
                # a non-finite gradient on any rank shows in the reduced P: keep the old Q and error
                bad = ~torch.isfinite(p_flat).all()
                torch.where(bad, q_flat, q_new, out=q_flat)
                if buf.dtype == torch.float32:
                    # M^ = P Q^T straight into each gradient, then e = M - M^ from it
                    for g, p, qt in zip(plan.groups, ps, new_qts):
                        for k, i in enumerate(g.members):
                            torch.mm(p[k], qt[k], out=grads[i].view(g.n, g.m))
                    approx = [grads[i].reshape(-1) for i in plan.order]
                else:
                    if b.approx is None:
                        b.approx = torch.empty_like(matrices)
                    for m_hat, p, qt in zip(plan.m_views(b.approx), ps, new_qts):
                        torch.bmm(p, qt, out=m_hat)  # M^ = P Q^T, fp32
                    approx = b.approx.split(b.numels)
                    for i, piece in zip(plan.order, approx):
                        grads[i].copy_(piece.view_as(grads[i]))
                if exact_buf is not None:
                    write_exact()
                if self.error_feedback:
                    for m, m_hat in zip(m_pieces, approx):
                        torch.sub(m, m_hat, out=m)  # e = M - M^
                    if device.type == "cpu" and not bool(bad):
                        # reading a CPU flag costs nothing: swap buffers instead of copying
                        b.matrices = self.memory.swap_flat("error", b.compressed, matrices)
                    else:
                        torch.where(bad, error, matrices, out=error)
            return buf

        waits = [q_fut] if exact_fut is None else [exact_fut, q_fut]
        return collect_all(waits).then(finish)

    # ---- checkpoints ---------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"generator": self._generator.get_state()}

    def load_extra_state(self, state: dict) -> None:
        self._generator.set_state(state["generator"])
        self._buckets.clear()
