"""dist-EF-SGDM: blockwise scaled sign with worker and server error feedback, Nesterov momentum,
two-way compression (Zheng, Huang, Kwok, NeurIPS 2019; ALGORITHMS.md section 1).

Per step, in gradient units (section 1b), with ``rho = lr_{t-1} / lr_t``::

    worker i:  m_i = mu * m_i + g_i
               p_i = g_i + mu * m_i + rho * e_i        (Nesterov; p_i = m_i + rho * e_i without)
               Delta_i = C(p_i) ;  e_i = p_i - Delta_i  C = blockwise scaled sign
    server:    p = mean_i Delta_i + rho * e_srv
               Delta = C(p) ;  e_srv = p - Delta
    returned:  Delta (the optimizer steps x -= lr * (Delta + weight_decay * x))

Weight decay stays out of the compressed path: the optimizer applies it after the hook (plain
``torch.optim.SGD(params, lr, weight_decay=...)`` with ``momentum=0``; the hook already applies
momentum). ``momentum=0`` gives dist-EF-SGD.

Topologies (identical results):

* ``"sharded"`` (default): shard ``j`` of every bucket is owned by rank ``j``; each worker sends
  its compressed shard ``j`` to rank ``j`` (all-to-all), the owner runs the server step with its
  own shard of the server error and the re-compressed shards are all-gathered. Bytes per worker
  do not grow with the world size.
* ``"allgather"``: every worker's message is all-gathered and every rank runs the server step.

Non-finite gradients: a worker whose bucket holds inf/NaN flags it in its message; every rank
then returns NaN for that bucket (so ``GradScaler`` skips the step) and neither error memory nor
the momentum takes the bucket's values in.
"""

import torch
from torch.futures import Future

from .. import native
from ..compress.sign import ShardPlan, block_sizes, compress, ranges
from ..core import HookState, check_choice, check_float, check_int
from ..core.layouts import LayoutCache


class _Layout:
    """Everything about one bucket layout that follows from its shapes, and fp32 workspaces
    (so that no bucket-sized tensor is allocated per step)."""

    def __init__(self, params, block_size, n):
        sizes = block_sizes([p.numel() for p in params], block_size)
        device = params[0].device
        self.numel = sum(sizes)
        self.blocks = ranges(sizes)
        self.plan = ShardPlan.build(sizes, n, device)
        self.p = torch.empty(self.numel, device=device)  # worker message before compression
        self.momentum = torch.empty(self.numel, device=device)  # candidate momentum
        self.local = torch.empty(self.numel, device=device)  # candidate error p - C(p)
        # decoded server message, for 16-bit buckets only (fp32 buckets take it directly)
        self.out = None if params[0].dtype == torch.float32 else torch.empty(self.numel, device=device)
        self.mean = torch.empty(self.plan.shard, device=device)  # mean of the workers' shards
        self.shard = torch.empty(self.plan.shard, device=device)  # scratch of one shard


def worker_input(g, momentum, momentum_out, mu: float, nesterov: bool, error, rho, p) -> torch.Tensor:
    """The compressor's input ``p`` (module docstring): ``m' = g + mu m`` into ``momentum_out``
    (when ``momentum`` is not None), ``p = (g + mu m' or m' or g) + rho e``."""
    if not torch.is_tensor(rho) and native.usable(g, p):
        return native.ef_input(g, momentum, momentum_out, mu, nesterov, error, rho, p)
    if momentum is not None:
        torch.add(g, momentum, alpha=mu, out=momentum_out)  # m' = mu m + g
        if nesterov:
            torch.add(g, momentum_out, alpha=mu, out=p)  # g + mu m'
        else:
            p.copy_(momentum_out)
    else:
        p.copy_(g)
    if torch.is_tensor(rho):
        p.addcmul_(error, rho)
    else:
        p.add_(error, alpha=rho)
    return p


class EFSignSGDM(HookState):
    """dist-EF-SGDM state and hook.

    ``state = ddp_hooks.EFSignSGDM(momentum=0.9).register(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1))``

    Args:
        momentum: worker momentum ``mu`` in [0, 1); 0 gives dist-EF-SGD.
        nesterov: use the Nesterov look-ahead ``g + mu * m`` (the paper's choice).
        block_size: blocks of this many elements within each parameter tensor; ``None`` (the
            default) gives one block per parameter tensor.
        topology: ``"sharded"`` or ``"allgather"`` (see the module docstring).
        warmup_steps: first steps reduced by an exact fp32 all-reduce.
        process_group: the group to reduce over (default WORLD).

    The learning rate is read from the optimizer given to :meth:`register` (warm-up schedules
    included); that optimizer must not apply momentum itself.
    """

    def __init__(
        self,
        momentum: float = 0.9,
        *,
        nesterov: bool = True,
        block_size: int | None = None,
        topology: str = "sharded",
        warmup_steps: int = 0,
        process_group=None,
    ) -> None:
        self.momentum = check_float("momentum", momentum, 0.0, 1.0, high_open=True)
        self.nesterov = bool(nesterov)
        self.block_size = None if block_size is None else check_int("block_size", block_size, 1)
        self.topology = check_choice("topology", topology, {"sharded", "allgather"})
        self.stages = 2 if topology == "sharded" else 1
        super().__init__(process_group=process_group, warmup_steps=warmup_steps)
        self._layouts = LayoutCache(lambda params: _Layout(params, self.block_size, self.world_size))
        self._lr_prev: dict[int, float] = {}

    # ---- wiring -----------------------------------------------------------------------------
    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            if group.get("momentum", 0) or "betas" in group:
                raise ValueError(
                    "EFSignSGDM applies momentum inside the hook (worker momentum before "
                    "compression); an optimizer that applies momentum too would apply it twice. "
                    "Use torch.optim.SGD(params, lr=..., momentum=0, weight_decay=...) and set "
                    "the momentum on EFSignSGDM(momentum=...)"
                )

    def _rho(self, params):
        """``lr_{t-1} / lr_t`` per parameter: a float, or a per-element tensor when they differ."""
        lrs = self.learning_rates(params)
        rhos = []
        for p, lr in zip(params, lrs):
            prev = self._lr_prev.get(id(p))
            rhos.append(prev / lr if prev is not None and prev > 0 and lr > 0 else 1.0)
            self._lr_prev[id(p)] = lr
        if all(r == rhos[0] for r in rhos):
            return rhos[0]
        counts = torch.tensor([p.numel() for p in params], device=params[0].device)
        return torch.repeat_interleave(torch.tensor(rhos, device=params[0].device), counts)

    # ---- the algorithm ----------------------------------------------------------------------
    def reduce(self, bucket, step: int) -> Future:
        params, buf = bucket.parameters(), bucket.buffer()
        device = buf.device
        layout = self._layouts.get(params, step)
        rho = self._rho(params)
        mem = self.memory
        repair = self.topology == "sharded" and mem.needs_assembly("server_error", params)
        error = mem.flat("error", params)
        server_error = mem.flat("server_error", params)
        momentum = mem.flat("momentum", params) if self.momentum > 0 else None

        with self.time(step, "compress", device):
            g = buf if buf.dtype == torch.float32 else buf.to(torch.float32)
            p = worker_input(g, momentum, layout.momentum, self.momentum, self.nesterov, error, rho, layout.p)
            packed, scales = compress(p, layout.blocks, layout.local)  # local = p - C(p)
            # the memories are finite, so the fp64 block sums are finite iff the gradient is
            bad = ~torch.isfinite(scales).all()
        self.count_bits(step, layout.numel + 32 * len(layout.blocks))
        # fp32 buckets take the server's message directly (the gradient is consumed by then)
        out = buf if buf.dtype == torch.float32 else layout.out

        def commit(delta: torch.Tensor, step_bad: torch.Tensor) -> torch.Tensor:
            """Worker memories take this step only if every worker's bucket was finite."""
            with self.time(step, "decompress", device):
                if device.type == "cpu" and not bool(step_bad):
                    # reading a CPU flag costs nothing: swap buffers instead of copying
                    layout.local = mem.swap_flat("error", params, layout.local)
                    if momentum is not None:
                        layout.momentum = mem.swap_flat("momentum", params, layout.momentum)
                else:
                    torch.where(step_bad, error, layout.local, out=error)
                    if momentum is not None:
                        torch.where(step_bad, momentum, layout.momentum, out=momentum)
                if delta.data_ptr() != buf.data_ptr():
                    buf.copy_(delta)
                if device.type != "cpu" or bool(step_bad):
                    buf.masked_fill_(step_bad, float("nan"))
            return buf

        if self.topology == "allgather":
            return self._allgather(layout, packed, scales, bad, server_error, rho, out, commit, step)
        return self._sharded(layout, packed, scales, bad, server_error, rho, repair, out, commit, step)

    def _server(self, layout, j, mean, server_error, rho, any_bad):
        """Server step on shard ``j``: p = mean + rho * e_srv; Delta = C(p); e_srv = p - Delta.
        ``mean`` is the shard's ``(shard,)`` mean of the workers' messages (overwritten).
        Returns (packed, scales) of Delta, scales NaN if any worker's bucket was not finite."""
        plan = layout.plan
        lo = j * plan.shard
        hi = min(lo + plan.shard, plan.numel)
        valid = max(0, hi - lo)
        e = server_error[lo:hi]
        p = mean
        if valid:
            if torch.is_tensor(rho):
                p[:valid].addcmul_(e, rho[lo:hi])
            else:
                p[:valid].add_(e, alpha=rho)
        packed, scales = plan.compress(j, p, layout.shard)  # shard[:valid] = p - C(p)
        bad = any_bad | ~torch.isfinite(scales).all()
        if valid:
            if e.device.type == "cpu" and not bool(bad):
                e.copy_(layout.shard[:valid])
            else:
                torch.where(bad, e, layout.shard[:valid], out=e)
        return packed, scales.masked_fill(bad, float("nan"))

    def _worker_mean(self, layout, j, packed_rows, scale_rows) -> torch.Tensor:
        """Mean over workers of their decoded messages for shard ``j``, added in rank order."""
        plan, acc = layout.plan, layout.mean
        plan.decode(j, packed_rows[0], scale_rows[0], acc)
        for i in range(1, packed_rows.shape[0]):
            plan.decode(j, packed_rows[i], scale_rows[i], acc, accumulate=True, work=layout.shard)
        return acc.div_(packed_rows.shape[0])

    def _decode_replies(self, layout, replies: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All shards' server messages ``(n, shard/8 + 4k)`` -> (Delta in ``out``, non-finite flag)."""
        plan = layout.plan
        nbytes = plan.shard // 8
        out_scales = replies[:, nbytes:].contiguous().view(torch.float32)
        for j in range(plan.n):
            plan.decode(j, replies[j, :nbytes], out_scales[j], out[j * plan.shard : (j + 1) * plan.shard])
        return out, ~torch.isfinite(out_scales).all()

    def _allgather(self, layout, packed, scales, bad, server_error, rho, out, commit, step) -> Future:
        plan = layout.plan
        nbytes = packed.numel()
        payload = torch.cat([packed, scales.view(torch.uint8), bad.float().view(1).view(torch.uint8)])
        gathered = self.transport.all_gather(payload, step)

        def finish(fut: Future) -> torch.Tensor:
            rows = fut.value()
            with self.time(step, "decompress", rows.device):
                all_scales = rows[:, nbytes : nbytes + 4 * len(layout.blocks)].contiguous().view(torch.float32)
                any_bad = rows[:, -4:].contiguous().view(torch.float32).sum() > 0
                # every rank decodes every worker's message and runs every shard's server step
                signs = [torch.cat([rows[i, :nbytes], rows.new_full((plan.n * plan.shard // 8 - nbytes,), 255)])
                         for i in range(rows.shape[0])]
                piece_scales = [plan.piece_scales(all_scales[i]) for i in range(rows.shape[0])]
                replies = []
                for j in range(plan.n):
                    sb = slice(j * plan.shard // 8, (j + 1) * plan.shard // 8)
                    mean = self._worker_mean(
                        layout, j, torch.stack([sg[sb] for sg in signs]), torch.stack([ps[j] for ps in piece_scales])
                    )
                    out_packed, out_scales = self._server(layout, j, mean, server_error, rho, any_bad)
                    replies.append(torch.cat([out_packed, out_scales.view(torch.uint8)]))
                delta, step_bad = self._decode_replies(layout, torch.stack(replies), out)
            return commit(delta, step_bad)

        return gathered.then(finish)

    def _sharded(self, layout, packed, scales, bad, server_error, rho, repair, out, commit, step) -> Future:
        plan = layout.plan
        n, j = plan.n, self.rank
        shard_bytes = plan.shard // 8
        signs = torch.full((n * shard_bytes,), 255, dtype=torch.uint8, device=packed.device)
        signs[: packed.numel()] = packed  # padding elements are zeros: sign bit 1
        flag = bad.float().expand(n, 1)
        rows = torch.cat(
            [signs.view(n, shard_bytes), plan.piece_scales(scales).view(torch.uint8), flag.contiguous().view(torch.uint8)],
            dim=1,
        )
        after = None
        if repair:
            # a new bucket layout: the server error of this rank's new shard may have been owned
            # by another rank; every rank holds zeros outside its old shard, so a sum restores it
            after = self.transport.all_reduce(server_error, step)

        def server(received: torch.Tensor) -> torch.Tensor:
            if repair:
                lo, hi = j * plan.shard, min((j + 1) * plan.shard, plan.numel)
                server_error[:lo].zero_()
                server_error[hi:].zero_()
            scale_rows = received[:, shard_bytes : shard_bytes + 4 * plan.k].contiguous().view(torch.float32)
            any_bad = received[:, -4:].contiguous().view(torch.float32).sum() > 0
            mean = self._worker_mean(layout, j, received[:, :shard_bytes], scale_rows)
            out_packed, out_scales = self._server(layout, j, mean, server_error, rho, any_bad)
            return torch.cat([out_packed, out_scales.view(torch.uint8)])

        replies = self.transport.sharded_exchange(rows, server, step, after=after)

        def finish(fut: Future) -> torch.Tensor:
            with self.time(step, "decompress", packed.device):
                delta, step_bad = self._decode_replies(layout, fut.value(), out)
            return commit(delta, step_bad)

        return replies.then(finish)

    # ---- checkpoints ---------------------------------------------------------------------------
    def extra_state(self) -> dict:
        names = self._require_names()
        return {"lr_prev": {names[i]: lr for i, lr in self._lr_prev.items()}}

    def load_extra_state(self, state: dict) -> None:
        self._lr_prev = {id(self._named[n]): lr for n, lr in state["lr_prev"].items()}
        self._layouts.clear()
