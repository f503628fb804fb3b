"""LAQ: lazily aggregated quantized gradients (Sun, Chen, Giannakis, Yang, NeurIPS 2019).

Worker ``m`` quantizes the innovation of its gradient against the last gradient it uploaded
and uploads it only when the innovation is large compared with the recent model movement::

    Q_new  = Q(g_m; Q_ref)                  b-bit grid of radius ||g_m - Q_ref||_inf around Q_ref
    dQ     = Q_new - Q_ref ;  eps2 = ||g_m - Q_new||^2
    upload if ||dQ||^2 >= (1 / lr^2) sum_d xi_d ||theta^{k+1-d} - theta^{k-d}||^2
                          + 3 (eps2 + eps2_at_last_upload)        or after t_bar silent rounds
                                                          or in the worker's first round
    every rank: aggregate += sum of the uploaded dQ ;  gradient = aggregate / M

so a skipping worker's last upload keeps counting (stale). ``1 / lr^2`` is the paper's
``1 / (alpha^2 M^2)`` in DDP's mean convention (``alpha = lr / M``). The defaults are SLAQ's
threshold ``1.5 (eps2 + eps2_last) + 0.2`` (minibatch gradients); the paper's LAQ (``3 (eps2 +
eps2_last)``), LAG (no quantization) and QGD (no skipping) are settings of this class:
:meth:`LAQ.paper`, :meth:`LAQ.lag`, :meth:`LAQ.qgd`.

Where the rule runs: it needs the whole gradient, so the hook holds every bucket of a step and
decides at the last one (their futures complete then), before the optimizer steps; closures
and Lightning's automatic optimization therefore see the aggregated gradient. The model
change is recorded after each step of the optimizer the state follows. Every rank issues the
same collectives every step, whatever it decides: first the flags (upload, not finite), then
the payloads. ``wire="uploads"`` (default) reads the flags and broadcasts only the uploaders'
payloads (fp32 radius + b-bit packed codes), the bytes the paper counts; ``wire="dense"``
all-reduces the dequantized innovations (zeros for skipping workers) with no host
synchronization, but as many bytes as an fp32 all-reduce. If any rank's gradient is not
finite, every rank returns NaN and neither references nor the aggregate change.
"""

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch.futures import Future
from typing_extensions import Unpack

from ..comm import done
from ..compress.laq import Quantized, UploadMessage, apply_codes, grid_radius, quantize_step
from ..core import Bucket, Held, HookState, Runtime, is_set, nonfinite
from ..core.flags import keep_unless
from .laq_state import LAQMemory, LAQSettings, write_mean


@dataclass
class _Decision:
    """What a worker decided in one round (0-d tensors) and its quantizer round."""

    bad: torch.Tensor
    upload: torch.Tensor
    error2: torch.Tensor
    quantized: Quantized | None


class LAQ(HookState):
    """LAQ state: the rule and the aggregation run in the hook, at a step's last bucket.

    ``state = ddp_hooks.LAQ(bits=4).register(ddp, torch.optim.SGD(ddp.parameters(), lr=0.2))``

    The optimizer must be ``torch.optim.SGD`` with one learning rate: the rule compares the
    gradient's innovation with the model's movement divided by the learning rate, which is
    what a plain gradient step moves it by.
    """

    memory_slots = ("q_ref", "aggregate", "theta_prev")
    warmup = False  # the skip rule and the quantization references start at step 0
    settings_type = LAQSettings
    settings: LAQSettings

    def __init__(
        self,
        bits: int = 4,
        *,
        memory_depth: int = 10,
        xi: float | None = None,
        max_staleness: int = 10,
        quantize: bool = True,
        skip: bool = True,
        error_weight: float = 1.5,
        threshold_offset: float = 0.2,
        wire: str = "uploads",
        **runtime: Unpack[Runtime],
    ) -> None:
        settings = LAQSettings.of(locals())
        super().__init__(settings, **runtime)
        self.rule = LAQMemory(self.settings.memory_depth, self.settings.max_staleness)
        self._params: list[torch.Tensor] | None = None

    @classmethod
    def paper(cls, **kwargs: Any) -> "LAQ":
        """The paper's LAQ for full (local) gradients: error weight 3, no offset, t_bar 100."""
        return cls(**{"error_weight": 3.0, "threshold_offset": 0.0, "max_staleness": 100, **kwargs})

    @classmethod
    def lag(cls, **kwargs: Any) -> "LAQ":
        """LAG: lazy aggregation of full-precision gradient innovations (the paper's rule)."""
        return cls.paper(quantize=False, **kwargs)

    @classmethod
    def qgd(cls, **kwargs: Any) -> "LAQ":
        """QGD: quantized innovations uploaded every round."""
        return cls.paper(skip=False, **kwargs)

    # ---- the optimizer ----------------------------------------------------------------------
    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.SGD):
            raise ValueError(
                f"LAQ's skip rule needs plain gradient steps (torch.optim.SGD); {type(optimizer).__name__} "
                "scales each coordinate's step, so the model's movement no longer measures the gradient "
                '(Hugging Face Trainer: TrainingArguments(optim="sgd"))'
            )
        if len({float(g["lr"]) for g in optimizer.param_groups}) > 1:
            raise ValueError("LAQ's skip rule uses one learning rate: give every param group the same lr")
        if any(g.get("momentum", 0) for g in optimizer.param_groups):
            warnings.warn("LAQ with momentum: stale gradients are amplified (the paper uses plain SGD)", stacklevel=3)

    def needs_last_bucket(self) -> bool:
        return True  # the rule decides at the step's last bucket

    def after_step(self) -> None:
        """Remember ``||theta^{k+1} - theta^k||^2`` (the last D of them)."""
        if self._params is not None:
            step = max(0, self.step - 1)
            theta_prev = self.memory.flat("theta_prev", self._params)
            self.rule.record_change(self._params, theta_prev, lambda change: self.combine(change, step))

    # ---- the hook -----------------------------------------------------------------------------
    def reduce(self, bucket: Bucket, step: int) -> Future[torch.Tensor]:
        if not bucket.is_last:
            return self._held.hold(bucket.buffer, bucket.params)
        return self._held.release(bucket.buffer, bucket.params, lambda held: self._round(held, step))

    def _round(self, held: list[Held], step: int) -> Future[None]:
        """Decide, communicate, and write ``aggregate / M`` into every bucket of the step."""
        params = [p for h in held for p in h.params]
        if self._params is None or [id(p) for p in params] != [id(p) for p in self._params]:
            if self.memory.missing("theta_prev", params):
                self.memory.flat("theta_prev", params).copy_(
                    torch.cat([p.detach().reshape(-1).float() for p in params])
                )
            self._params = params
        ws = self.rule.workspace(
            sum(p.numel() for p in params), params[0].device, self.settings.wire == "uploads" and self.settings.quantize
        )
        torch.cat([h.buffer.float() if h.buffer.dtype != torch.float32 else h.buffer for h in held], out=ws["g"])
        q_ref = self.memory.flat("q_ref", params)
        aggregate = self.memory.flat("aggregate", params)
        with self.time(step, "compress", q_ref.device):
            d = self._decide(ws, q_ref, params, step)
        flags = self.transport.all_gather(torch.stack([d.upload, d.bad]).to(torch.uint8), step).wait()
        any_bad = is_set(flags[:, 1])
        if self.settings.wire == "dense":
            send = torch.where(d.upload & ~d.bad, ws["innovation"], torch.zeros_like(ws["innovation"]))
            received = self.transport.all_reduce(send, step).wait().masked_fill_(any_bad, 0.0)
        else:
            received = self._uploads(flags, d.quantized, ws, step)
        with self.time(step, "decompress", q_ref.device):
            keep = d.upload & ~any_bad
            if received is not None:
                aggregate.add_(received)
            self._move_reference(ws, keep, d.quantized, q_ref)
            self.rule.after_round(keep, d.error2)
            self.rule.count(d.upload, flags[:, 0], any_bad)
            write_mean(held, aggregate, self.world_size, any_bad)
        return done(None)

    def _decide(
        self, ws: dict[str, torch.Tensor], q_ref: torch.Tensor, params: list[torch.Tensor], step: int
    ) -> _Decision:
        """This worker's round: quantize, then the skip rule. Where this rank serves part of
        the worker: one grid radius, and the rule's norms and finiteness, over its whole gradient."""
        g = ws["g"]
        bad = nonfinite(g)
        radius = self.combine(grid_radius(g, q_ref), step, largest=True) if self.partial else None
        if self.settings.wire == "uploads" and self.settings.quantize:
            quantized = quantize_step(g, q_ref, self.settings.bits, codes=ws["codes"], radius=radius)
        elif self.settings.quantize:
            quantized = quantize_step(
                g, q_ref, self.settings.bits, q_new=ws["q_new"], innovation=ws["innovation"], radius=radius
            )
        else:
            ws["q_new"].copy_(g)
            torch.sub(g, q_ref, out=ws["innovation"])
            quantized = None
        error2 = quantized.error2 if quantized is not None else torch.zeros((), dtype=torch.float64, device=g.device)
        innovation2 = (
            quantized.innovation2
            if quantized is not None
            else torch.linalg.vector_norm(ws["innovation"], dtype=torch.float64).square()
        )
        if self.partial:
            whole = self.combine(torch.stack([error2, innovation2, bad.to(torch.float64)]), step)
            error2, innovation2, bad = whole[0], whole[1], is_set(whole[2])
        if not self.settings.skip:
            return _Decision(bad, torch.ones((), dtype=torch.bool, device=g.device), error2, quantized)
        lr = self.learning_rates(params)[0] if self.rule.changes else 1.0
        threshold = self.rule.threshold(
            self.settings.weight, lr, self.settings.error_weight * (error2 + self.rule.eps2_last)
        )
        upload = (innovation2 >= threshold + self.settings.threshold_offset) | self.rule.stale()
        return _Decision(bad, upload, error2, quantized)

    def _uploads(
        self, flags: torch.Tensor, quantized: Any, ws: dict[str, torch.Tensor], step: int
    ) -> torch.Tensor | None:
        """Only the uploaders' payloads travel: one broadcast per uploader, the same list on
        every rank (it follows from the gathered flags). Returns their sum (None: nobody, or
        some rank not finite)."""
        if bool(is_set(flags[:, 1])):
            return None
        uploaders = [j for j, f in enumerate(flags[:, 0].tolist()) if f]
        if not uploaders:
            return None
        numel = ws["g"].numel()
        total = torch.zeros(numel, device=ws["g"].device)
        message = UploadMessage(numel, self.settings.bits)
        for j in uploaders:
            if self.settings.quantize:
                payload = torch.empty(message.nbytes, dtype=torch.uint8, device=total.device)
                if j == self.rank:
                    payload.copy_(message.pack(quantized.radius, ws["codes"]))
                message.add_to(total, self.transport.broadcast(payload, j, step).wait())
            else:
                payload = ws["innovation"].clone() if j == self.rank else torch.empty(numel, device=total.device)
                total += self.transport.broadcast(payload, j, step).wait()
        return total

    def _move_reference(
        self, ws: dict[str, torch.Tensor], keep: torch.Tensor, quantized: Any, q_ref: torch.Tensor
    ) -> None:
        """An uploader's reference moves to its Q_new."""
        if self.settings.wire == "uploads" and self.settings.quantize:
            if bool(keep):  # the flags were read on the host already
                apply_codes(q_ref, ws["codes"], quantized.radius, self.settings.bits)
        else:
            keep_unless(~keep, q_ref, ws["q_new"])

    # ---- reporting and checkpoints -------------------------------------------------------------
    def upload_bits(self, numel: int) -> int:
        """Bits of one upload as the paper counts them: 32 + b d (LAG: 32 d)."""
        return 32 + self.settings.bits * numel if self.settings.quantize else 32 * numel

    def stats(self) -> dict[str, Any]:
        """Adds ``uploads`` (this rank), ``uploads_all_ranks`` and the paper's bits for them."""
        out = super().stats()
        numel = sum(p.numel() for p in self._params) if self._params else 0
        uploads, everyone = self.rule.upload_counts()
        out["uploads"], out["uploads_all_ranks"] = uploads, everyone
        bits = uploads * self.upload_bits(numel)
        out["total"]["paper_bits"] = bits
        out["total"]["paper_ratio"] = 32 * out["total"]["elements"] / bits if bits else float("inf")
        return out

    def extra_state_dict(self) -> dict[str, Any]:
        return self.rule.state_dict()

    def extra_problems(self, extra: Any) -> list[str]:
        return self.rule.problems(extra)

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        self.rule.load_state_dict(state)
