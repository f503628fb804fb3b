"""LAQ: lazily aggregated quantized gradients (Sun, Chen, Giannakis, Yang, NeurIPS 2019;
ALGORITHMS.md section 5).

Worker ``m`` quantizes the innovation of its gradient against the last gradient it uploaded
and uploads it only when the innovation is large compared with the recent model movement::

    Q_new  = Q(g_m; Q_ref)                  b-bit grid of radius ||g_m - Q_ref||_inf around Q_ref
    dQ     = Q_new - Q_ref ;  eps2 = ||g_m - Q_new||^2
    upload if ||dQ||^2 >= (1 / lr^2) sum_d xi_d ||theta^{k+1-d} - theta^{k-d}||^2
                          + 3 (eps2 + eps2_at_last_upload)        or after t_bar silent rounds
                                                          or in the worker's first round
    every rank: aggregate += sum of the uploaded dQ ;  gradient = aggregate / M

so a skipping worker's last upload keeps counting (stale). ``1 / lr^2`` is the paper's
``1 / (alpha^2 M^2)`` in DDP's mean convention (``alpha = lr / M``). LAG (no quantization),
QGD (no skipping) and SLAQ (the stochastic variant's threshold ``1.5 (eps2 + eps2_last) + 0.2``)
are settings of this class: :meth:`LAQ.lag`, :meth:`LAQ.qgd`, :meth:`LAQ.slaq`.

Where the rule runs: it needs the whole gradient and the model change, so it runs in an
optimizer wrapper, after backward and before the local step; the DDP hook itself is a no-op
(the local gradient stays in ``p.grad``). Every rank issues the same collectives every step,
whatever it decides: first the upload flags (all-gather), then the payloads. ``wire="dense"``
(default) all-reduces the dequantized innovations (zeros for skipping workers; no host
synchronization); ``wire="uploads"`` reads the flags and broadcasts only the uploaders'
payloads (fp32 radius + b-bit packed codes), the bytes the paper counts.
"""

import torch
import torch.distributed as dist
from torch.futures import Future

from .. import native
from ..compress.laq import add_dequantized, apply_codes, pack_codes, quantize_step
from ..core import HookState, SyncOptimizer, check_choice, check_float, check_int


class LAQ(HookState):
    """LAQ state (no-op hook) and, through :meth:`register`, the optimizer wrapper.

    ``opt = ddp_hooks.LAQ(bits=4).register(ddp, torch.optim.SGD(ddp.parameters(), lr=0.2))``

    Args:
        bits: code width ``b`` in [1, 8].
        memory_depth: ``D``, how many past model changes the rule weighs (>= 1).
        xi: weight ``xi_d`` of each of them (default ``0.8 / D``); while fewer than ``D``
            changes exist, their mean is weighted by ``xi * D`` (as the authors' code does).
        max_staleness: ``t_bar``, an upload is forced after this many silent rounds (>= 1).
            A worker's first round always uploads: the paper relies on its history term
            being 0 there, but on deep networks the 2^b-point grid (which has no point at 0)
            can leave a quantization error larger than the innovation, and a worker that
            never uploads would contribute nothing for t_bar rounds.
        quantize: quantize the innovation (False: LAG, full precision).
        skip: apply the skip rule (False: QGD, upload every round).
        error_weight: factor on ``eps2 + eps2_last`` (3 for LAQ, 1.5 for SLAQ).
        threshold_offset: constant added to the threshold (0 for LAQ, 0.2 for SLAQ).
        wire: ``"dense"`` or ``"uploads"`` (see the module docstring).
        process_group: the group to reduce over (default WORLD).
    """

    def __init__(
        self,
        bits: int = 4,
        *,
        memory_depth: int = 10,
        xi: float | None = None,
        max_staleness: int = 100,
        quantize: bool = True,
        skip: bool = True,
        error_weight: float = 3.0,
        threshold_offset: float = 0.0,
        wire: str = "dense",
        process_group=None,
    ) -> None:
        self.bits = check_int("bits", bits, 1, 8)
        self.memory_depth = check_int("memory_depth", memory_depth, 1)
        self.xi = 0.8 / self.memory_depth if xi is None else check_float("xi", xi, 0.0)
        self.max_staleness = check_int("max_staleness", max_staleness, 1)
        self.quantize = bool(quantize)
        self.skip = bool(skip)
        self.error_weight = check_float("error_weight", error_weight, 0.0)
        self.threshold_offset = check_float("threshold_offset", threshold_offset, 0.0)
        self.wire = check_choice("wire", wire, {"dense", "uploads"})
        super().__init__(process_group=process_group)
        self._scalars: dict[str, torch.Tensor] | None = None
        self._ws: dict[str, torch.Tensor] | None = None  # fp32 workspaces of the model's size
        self._changes = 0  # model changes recorded so far (capped at D)

    @classmethod
    def lag(cls, **kwargs) -> "LAQ":
        """LAG: lazy aggregation of full-precision gradient innovations."""
        return cls(quantize=False, **kwargs)

    @classmethod
    def qgd(cls, **kwargs) -> "LAQ":
        """QGD: quantized innovations uploaded every round."""
        return cls(skip=False, **kwargs)

    @classmethod
    def slaq(cls, **kwargs) -> "LAQ":
        """SLAQ: the stochastic variant's threshold (for minibatch gradients)."""
        return cls(error_weight=1.5, threshold_offset=0.2, **kwargs)

    # ---- wiring ----------------------------------------------------------------------------
    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if len({float(g["lr"]) for g in optimizer.param_groups}) > 1:
            raise ValueError("LAQ's skip rule uses one learning rate: give every param group the same lr")

    def register(self, ddp: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        """Register the no-op hook; returns the optimizer wrapper (``optimizer`` is required)."""
        if optimizer is None:
            raise ValueError("LAQ runs its rule in an optimizer wrapper: pass register(ddp, optimizer)")
        super().register(ddp, optimizer)
        params = list(self._named.values())
        if self.memory.missing("theta_prev", params):
            self.memory.flat("theta_prev", params).copy_(self._flat_params(params))
        return LAQOptimizer(optimizer, self)

    def reduce(self, bucket, step: int) -> Future:
        fut: Future = Future()
        fut.set_result(bucket.buffer())  # the local gradient stays local until the wrapper runs
        return fut

    # ---- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _flat_params(params) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).float() for p in params])

    def _state_scalars(self, device) -> dict[str, torch.Tensor]:
        if self._scalars is None:
            zeros = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
            self._scalars = {
                "eps2_last": zeros(()),
                # rounds since the last upload; a worker that never uploaded counts as t_bar
                # stale, so round 0 uploads everywhere (see the class docstring)
                "clock": torch.full((), float(self.max_staleness), device=device),
                "changes": zeros(self.memory_depth),  # ring buffer of ||theta^{k+1} - theta^k||^2
                "uploads": zeros(()),  # this rank's uploads
                "uploads_all": zeros(()),  # every rank's uploads
            }
        return self._scalars

    def upload_bits(self, numel: int) -> int:
        """Bits of one upload as the paper counts them: 32 + b d (LAG: 32 d)."""
        return 32 + self.bits * numel if self.quantize else 32 * numel

    # ---- the rule and the aggregation (before the local step) ----------------------------------
    @property
    def _codes_only(self) -> bool:
        """Uploads mode with quantization: the round needs only the codes (what travels); the
        uploader's new reference is rebuilt from them, and nothing else is written."""
        return self.wire == "uploads" and self.quantize

    def _workspace(self, numel: int, device) -> dict[str, torch.Tensor]:
        ws = self._ws
        if ws is None or ws["g"].numel() != numel or ws["g"].device != device:
            names = ("g",) if self._codes_only else ("g", "q_new", "work")
            ws = self._ws = {k: torch.empty(numel, device=device) for k in names}
            if self._codes_only:
                ws["codes"] = torch.empty(numel, dtype=torch.uint8, device=device)
        return ws

    def aggregate(self, step: int) -> None:
        """Decide, communicate, and set every ``p.grad`` to ``aggregate / M``."""
        params = list(self._named.values())
        device = params[0].device
        s = self._state_scalars(device)
        n = self.world_size
        q_ref = self.memory.flat("q_ref", params)
        aggregate = self.memory.flat("aggregate", params)
        ws = self._workspace(q_ref.numel(), device)
        g, q_new, innovation = ws["g"], ws.get("q_new"), ws.get("work")
        torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params], out=g)
        lr = self.learning_rates(params)[0]

        with self.time(step, "compress", device):
            if self._codes_only:
                radius, eps2, innovation_sq = quantize_step(g, q_ref, self.bits, None, None, ws["codes"])
            elif self.quantize:
                radius, eps2, innovation_sq = quantize_step(g, q_ref, self.bits, q_new, innovation)
            else:
                radius = None
                q_new.copy_(g)
                eps2 = g.new_zeros(())
                torch.sub(q_new, q_ref, out=innovation)
                innovation_sq = torch.linalg.vector_norm(innovation).square()
            if self.skip:
                weight = self.xi * self.memory_depth / max(1, self._changes)
                history = weight * s["changes"].sum() / (lr * lr if lr > 0 else 1.0)
                threshold = history + self.error_weight * (eps2 + s["eps2_last"]) + self.threshold_offset
                upload = (innovation_sq >= threshold) | (s["clock"] >= self.max_staleness)
            else:
                upload = torch.ones((), dtype=torch.bool, device=device)

        flags = self.transport.all_gather(upload.to(torch.uint8).view(1), step).wait()
        if self.wire == "dense":
            received = self.transport.all_reduce(innovation.mul_(upload), step).wait()
        else:
            received = self._broadcast_uploads(flags, radius, ws.get("codes"), innovation, g.numel(), step, device)

        with self.time(step, "decompress", device):
            if received is not None:
                aggregate.add_(received)
            if self._codes_only:  # the flags were read on the host already
                if bool(upload):
                    apply_codes(q_ref, ws["codes"], radius, self.bits)
            elif device.type == "cpu":  # a CPU flag: swap buffers instead of copying
                if bool(upload):
                    ws["q_new"] = self.memory.swap_flat("q_ref", params, q_new)
            else:
                torch.where(upload, q_new, q_ref, out=q_ref)
            s["eps2_last"] = torch.where(upload, eps2, s["eps2_last"])
            s["clock"] = torch.where(upload, torch.zeros_like(s["clock"]), s["clock"] + 1)
            s["uploads"] += upload.float()
            s["uploads_all"] += flags.float().sum()
            for p, piece in zip(params, aggregate.split([p.numel() for p in params])):
                piece = piece.view_as(p)
                if p.grad is not None and p.grad.dtype == torch.float32 and p.grad.shape == p.shape:
                    torch.div(piece, n, out=p.grad)
                else:
                    grad = piece.div(n)
                    p.grad = grad if grad.dtype == p.dtype else grad.to(p.dtype)

    def _broadcast_uploads(self, flags, radius, codes, innovation, numel, step, device) -> torch.Tensor | None:
        """Only the uploaders' payloads travel: one broadcast per uploader, the same list on
        every rank (it follows from the all-gathered flags). Returns their sum (None: nobody
        uploaded)."""
        uploaders = [j for j, f in enumerate(flags.view(-1).tolist()) if f]
        if not uploaders:
            return None
        total = torch.zeros(numel, device=device)
        for j in uploaders:
            if self.quantize:
                nbytes = 4 + -(-numel * self.bits // 8)
                payload = torch.empty(nbytes, dtype=torch.uint8, device=device)
                if j == self.rank:
                    payload.copy_(torch.cat([radius.float().view(1).view(torch.uint8), pack_codes(codes, self.bits)]))
                self._broadcast(payload, j, step)
                add_dequantized(total, payload[4:], payload[:4].view(torch.float32).view(()), self.bits)
            else:
                payload = innovation.clone() if j == self.rank else torch.empty(numel, device=device)
                self._broadcast(payload, j, step)
                total += payload
        return total

    def _broadcast(self, tensor: torch.Tensor, src: int, step: int) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self._stats.collective(step, "broadcast", nbytes if src == self.rank else 0, nbytes)
        dist.broadcast(tensor, src=dist.get_global_rank(self.process_group, src), group=self.process_group)

    def record_model_change(self) -> None:
        """After the local step: remember ``||theta^{k+1} - theta^k||^2`` (the last D of them)."""
        params = list(self._named.values())
        s = self._state_scalars(params[0].device)
        prev = self.memory.flat("theta_prev", params)
        s["changes"] = torch.roll(s["changes"], 1)
        if all(native.usable(p) and p.dtype == torch.float32 for p in params) and native.usable(prev):
            pieces = prev.split([p.numel() for p in params])
            change = sum(native.sqdiff_copy(p.detach().reshape(-1), piece) for p, piece in zip(params, pieces))
            s["changes"][0] = change  # ||theta_new - theta||^2, theta_prev = theta_new
        else:
            ws = self._workspace(prev.numel(), prev.device)
            if "work" not in ws:  # the codes-only mode keeps no fp32 scratch otherwise
                ws["work"] = torch.empty_like(prev)
            work = ws["work"]
            torch.cat([p.detach().reshape(-1).float() for p in params], out=work)
            s["changes"][0] = torch.linalg.vector_norm(prev.sub_(work)).square()  # ||theta_new - theta||
            prev.copy_(work)
        self._changes = min(self.memory_depth, self._changes + 1)

    # ---- reporting and checkpoints ---------------------------------------------------------------
    def stats(self) -> dict:
        """Adds ``uploads`` (this rank), ``uploads_all_ranks`` and the paper's bits for them."""
        out = super().stats()
        numel = sum(p.numel() for p in self._named.values())
        if self._scalars is not None:
            uploads = int(self._scalars["uploads"].item())
            out["uploads"] = uploads
            out["uploads_all_ranks"] = int(self._scalars["uploads_all"].item())
            out["total"]["paper_bits"] = uploads * self.upload_bits(numel)
            bits = out["total"]["paper_bits"]
            out["total"]["paper_ratio"] = 32 * out["total"]["elements"] / bits if bits else float("inf")
        return out

    def extra_state(self) -> dict:
        scalars = None if self._scalars is None else {k: v.clone() for k, v in self._scalars.items()}
        return {"scalars": scalars, "changes": self._changes}

    def load_extra_state(self, state: dict) -> None:
        self._scalars = state["scalars"]
        self._changes = int(state["changes"])


class LAQOptimizer(SyncOptimizer):
    """Runs LAQ's rule and aggregation before each local step, records the model change after."""

    def before_step(self) -> None:
        self.hook_state.aggregate(max(0, self.hook_state.step - 1))

    def after_step(self) -> None:
        self.hook_state.record_model_change()
