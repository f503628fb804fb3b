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
from torch.futures import Future, collect_all

from ..compress.sign import ShardPlan, block_scales, block_sizes, pack_signs, segment_ids, unpack_signs
from ..core import HookState, check_choice, check_float, check_int


class _Layout:
    """Everything about one bucket layout that follows from its shapes (built once)."""

    def __init__(self, params, block_size, n, device):
        sizes = block_sizes([p.numel() for p in params], block_size)
        self.numel = sum(sizes)
        self.nblocks = len(sizes)
        self.ids = segment_ids(sizes, device)
        self.sizes = torch.tensor(sizes, dtype=torch.float64, device=device)
        self.plan = ShardPlan.build(sizes, n, device)


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
        self._layouts: dict[tuple, _Layout] = {}
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

    def _layout(self, params) -> _Layout:
        key = tuple(id(p) for p in params)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = _Layout(params, self.block_size, self.world_size, params[0].device)
        return layout

    def _rho(self, params, layout: _Layout):
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
        layout = self._layout(params)
        rho = self._rho(params, layout)
        mem = self.memory
        repair = self.topology == "sharded" and mem.needs_assembly("server_error", params)
        error = mem.flat("error", params)
        server_error = mem.flat("server_error", params)

        with self.time(step, "compress", device):
            g = buf.to(torch.float32)
            bad = ~torch.isfinite(g).all()
            if self.momentum > 0:
                momentum_new = mem.flat("momentum", params) * self.momentum + g
                p = g + self.momentum * momentum_new if self.nesterov else momentum_new.clone()
            else:
                momentum_new = None
                p = g.clone()
            p.add_(error * rho)
            packed = pack_signs(p)
            scales = block_scales(p, layout.ids, layout.sizes)
        self.count_bits(step, layout.numel + 32 * layout.nblocks)

        def commit(delta: torch.Tensor, step_bad: torch.Tensor) -> torch.Tensor:
            """Worker memories take this step only if every worker's bucket was finite."""
            with self.time(step, "decompress", device):
                local = unpack_signs(packed, layout.numel) * scales[layout.ids]
                torch.where(step_bad, error, p - local, out=error)
                if momentum_new is not None:
                    momentum = mem.flat("momentum", params)
                    torch.where(step_bad, momentum, momentum_new, out=momentum)
                buf.copy_(delta.masked_fill(step_bad, float("nan")))
            return buf

        if self.topology == "allgather":
            return self._allgather(layout, packed, scales, bad, server_error, rho, commit, step)
        return self._sharded(layout, packed, scales, bad, server_error, rho, repair, commit, step)

    def _server(self, layout, mean, server_error, rho, shards, any_bad):
        """Server step on padded shards: p = mean + rho * e_srv; Delta = C(p); e_srv = p - Delta.

        ``mean`` is ``(m, shard)`` for the shards ``shards``; returns (packed, scales, Delta).
        """
        plan = layout.plan
        e_rows = plan.pad(server_error)[shards]
        rho_rows = plan.pad(rho)[shards] if torch.is_tensor(rho) else rho
        p = mean + rho_rows * e_rows
        packed, scales, delta = plan.compress_shards(p, shards)
        bad = any_bad | ~torch.isfinite(p).all()
        new = torch.where(bad, e_rows, p - delta).reshape(-1)
        lo = shards.start * plan.shard
        hi = min(lo + new.numel(), plan.numel)
        server_error[lo:hi] = new[: hi - lo]
        scales = scales.masked_fill(bad, float("nan"))
        return packed, scales

    def _decode_mean(self, layout, packed_rows, scale_rows, shards=None) -> torch.Tensor:
        """Mean over workers of the decompressed messages, summed in rank order."""
        plan = layout.plan
        n_elem = packed_rows.shape[1] * 8
        acc = None
        for i in range(packed_rows.shape[0]):
            if shards is None:
                values = unpack_signs(packed_rows[i], layout.numel) * scale_rows[i][layout.ids]
                values = plan.pad(values).view(1, -1)
            else:
                values = unpack_signs(packed_rows[i], n_elem) * plan.expand(scale_rows[i : i + 1], shards)
            acc = values if acc is None else acc.add_(values)
        return (acc / packed_rows.shape[0]).view(-1, plan.shard)

    def _allgather(self, layout, packed, scales, bad, server_error, rho, commit, step) -> Future:
        nbytes = packed.numel()
        payload = torch.cat([packed, scales.view(torch.uint8), bad.float().view(1).view(torch.uint8)])
        gathered = self.transport.all_gather(payload, step)
        plan = layout.plan

        def finish(fut: Future) -> torch.Tensor:
            rows = fut.value()
            with self.time(step, "decompress", rows.device):
                scale_rows = rows[:, nbytes : nbytes + 4 * layout.nblocks].contiguous().view(torch.float32)
                any_bad = rows[:, -4:].contiguous().view(torch.float32).sum() > 0
                mean = self._decode_mean(layout, rows[:, :nbytes], scale_rows)
                all_shards = slice(0, plan.n)
                out_packed, out_scales = self._server(layout, mean, server_error, rho, all_shards, any_bad)
                delta = (unpack_signs(out_packed, plan.shard) * plan.expand(out_scales)).reshape(-1)
            return commit(delta[: plan.numel], ~torch.isfinite(out_scales).all())

        return gathered.then(finish)

    def _sharded(self, layout, packed, scales, bad, server_error, rho, repair, commit, step) -> Future:
        plan = layout.plan
        n, j = plan.n, self.rank
        shard_bytes = plan.shard // 8
        own = slice(j, j + 1)
        signs = torch.full((n * shard_bytes,), 255, dtype=torch.uint8, device=packed.device)
        signs[: packed.numel()] = packed  # padding elements are zeros: sign bit 1
        signs = signs.view(n, shard_bytes)
        flag = bad.float().expand(n, 1)
        rows = torch.cat(
            [signs, plan.piece_scales(scales).view(torch.uint8), flag.contiguous().view(torch.uint8)], dim=1
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
            mean = self._decode_mean(layout, received[:, :shard_bytes], scale_rows, own)
            out_packed, out_scales = self._server(layout, mean, server_error, rho, own, any_bad)
            return torch.cat([out_packed.view(-1), out_scales.view(-1).view(torch.uint8)])

        replies = self.transport.sharded_exchange(rows, server, step, after=after)

        def finish(fut: Future) -> torch.Tensor:
            got = fut.value()
            with self.time(step, "decompress", got.device):
                out_scales = got[:, shard_bytes:].contiguous().view(torch.float32)
                delta = (unpack_signs(got[:, :shard_bytes], plan.shard) * plan.expand(out_scales)).reshape(-1)
            return commit(delta[: plan.numel], ~torch.isfinite(out_scales).all())

        return replies.then(finish)

    # ---- checkpoints ---------------------------------------------------------------------------
    def extra_state(self) -> dict:
        names = self._require_names()
        return {"lr_prev": {names[i]: lr for i, lr in self._lr_prev.items()}}

    def load_extra_state(self, state: dict) -> None:
        self._lr_prev = {id(self._named[n]): lr for n, lr in state["lr_prev"].items()}
        self._layouts = {}
