"""CSER: communication-efficient SGD with error reset (Xie et al., NeurIPS 2020; ALGORITHMS.md
section 2), with GRBS as the compressor.

Every worker keeps its own model ``x_i = x^ + e_i``: ``x^`` is the model all ranks agree on,
``e_i`` the local residual (neither is stored: only ``x_i`` is). Per step::

    partial gradient sync (the hook):  g_i[S1] <- mean_j g_j[S1]   S1 = GRBS(grad_ratio) over the
                                       model, drawn once per step from a shared generator
                                       the rest of g_i stays local, the local optimizer steps
                                       (local momentum: M-CSER), so local models bifurcate
    every `period` steps, error reset: c_i = C(e_i)                 C = GRBS(model_ratio)
    (the optimizer wrapper)            x_i <- x_i - c_i + mean_j c_j ;  x^ <- x^ + mean_j c_j
                                       (so e_i <- e_i - c_i)

With GRBS the reset is partial model averaging on the selected blocks. Special cases:
``grad_ratio=None`` (no gradient sync) with ``period=1`` is CSEA, with ``period=H`` CSER-PL;
``grad_ratio=1`` and ``model_ratio=1`` is synchronous SGD. The overall compression ratio is
``RC = 1 / (1 / (model_ratio * period) + 1 / grad_ratio)`` (:func:`overall_ratio`).
"""

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.futures import Future

from ..compress import grbs
from ..compress.sparse import KINDS, MessagePlan, subtract_message
from ..core import HookState, PeriodicSyncOptimizer, check_choice, check_float, check_int, nonfinite
from ..core.layouts import LayoutCache

#: reset compressors besides GRBS (the sparse/quantized codecs; residuals tracked explicitly)
RESET_CODECS = tuple(k for k in KINDS if k != "grbs")


def overall_ratio(grad_ratio: float | None, model_ratio: float, period: int) -> float:
    """``RC = 1 / [1 / (model_ratio * period) + 1 / grad_ratio]`` (``grad_ratio=None``: no sync)."""
    grad_term = 0.0 if grad_ratio is None else 1.0 / grad_ratio
    return 1.0 / (1.0 / (model_ratio * period) + grad_term)


def propose(target: float, model_ratios=(1, 2, 4, 8, 16, 32)) -> list[dict]:
    """Configurations with overall ratio ``target``, splitting the budget equally between the two
    synchronizations (the released ImageNet configurations do): ``grad_ratio = 2 * target`` and
    ``model_ratio * period = 2 * target``; plus CSEA and CSER-PL for comparison."""
    target = check_float("target", target, 1.0)
    out = []
    for model_ratio in model_ratios:
        period = 2 * target / model_ratio
        if period >= 1 and float(period).is_integer():
            cfg = {"grad_ratio": 2 * target, "model_ratio": model_ratio, "period": int(period)}
            out.append({**cfg, "variant": "CSER", "ratio": overall_ratio(**cfg)})
    out.append({"grad_ratio": None, "model_ratio": target, "period": 1, "variant": "CSEA", "ratio": target})
    for period in (4, 8, 16, 32):
        if target / period >= 1:
            out.append({"grad_ratio": None, "model_ratio": target / period, "period": period,
                        "variant": "CSER-PL", "ratio": target})
    return out


class CSER(HookState):
    """CSER state: the partial-gradient-sync hook and the error reset.

    ``opt = ddp_hooks.CSER(grad_ratio=64, model_ratio=4, period=16).register(ddp, torch.optim.SGD(...))``
    returns the optimizer wrapper to step; ``opt.averaged()`` averages the local models for
    evaluation or checkpointing.

    Args:
        grad_ratio: GRBS ratio of the every-step gradient sync (>= 1), or ``None`` for none.
        model_ratio: ratio of the error reset (>= 1; 1 resets the residual completely).
        period: steps between error resets (``H`` >= 1).
        block_size: GRBS block size in elements.
        model_compressor: ``"grbs"`` (default: the reset is partial model averaging) or one of
            ``"topk"``, ``"randk"``, ``"signtopk"``, ``"qtopk"``, ``"sign"``, ``"qsgd"`` (keeping
            ``1 / model_ratio`` of each tensor where it sparsifies); these track the residual
            ``e_i = x_i - x^`` against an explicitly stored agreed model ``x^`` (one more copy
            of the model) and all-gather their fixed-size payloads.
        levels: quantization levels for ``qtopk`` / ``qsgd``.
        seed: seed of the generator shared by all ranks (independent of the global RNG).
        warmup_steps: first steps reduced by an exact fp32 all-reduce.
        process_group: the group to reduce over (default WORLD).
    """

    def __init__(
        self,
        grad_ratio: float | None = 64.0,
        model_ratio: float = 4.0,
        period: int = 16,
        *,
        block_size: int = 256,
        model_compressor: str = "grbs",
        levels: int = 16,
        seed: int = 0,
        warmup_steps: int = 0,
        process_group=None,
    ) -> None:
        self.grad_ratio = None if grad_ratio is None else check_float("grad_ratio", grad_ratio, 1.0)
        self.model_ratio = check_float("model_ratio", model_ratio, 1.0)
        self.period = check_int("period", period, 1)
        self.block_size = check_int("block_size", block_size, 1)
        self.model_compressor = check_choice("model_compressor", model_compressor, {"grbs", *RESET_CODECS})
        self.levels = check_int("levels", levels, 1, 255)
        self.seed = check_int("seed", seed, 0)
        super().__init__(process_group=process_group, warmup_steps=warmup_steps)
        self._offsets: dict[int, int] | None = None  # each parameter's start in the model order
        self._total = 0
        self._drawn: tuple = (None, None)  # (step, this step's model-wide selection)
        self._generator = torch.Generator().manual_seed(self.seed)  # shared by all ranks
        self._local = torch.Generator().manual_seed(self.seed + 1_000_003 * self.rank)  # this rank's
        keep = 1.0 / self.model_ratio
        self._plans = LayoutCache(
            lambda params: MessagePlan(params, self.model_compressor, keep if keep < 1 else 2**62, self.levels)
        )

    @classmethod
    def csea(cls, ratio: float, **kwargs) -> "CSER":
        """CSEA: no gradient sync, a partial model sync (error reset) every step."""
        return cls(grad_ratio=None, model_ratio=ratio, period=1, **kwargs)

    @classmethod
    def partial_local_sgd(cls, model_ratio: float, period: int, **kwargs) -> "CSER":
        """CSER-PL: local SGD with a partial model sync every ``period`` steps."""
        return cls(grad_ratio=None, model_ratio=model_ratio, period=period, **kwargs)

    @property
    def ratio(self) -> float:
        """The overall compression ratio RC of this configuration."""
        return overall_ratio(self.grad_ratio, self.model_ratio, self.period)

    # ---- wiring ----------------------------------------------------------------------------
    def register(self, ddp: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        """Register the hook; returns the optimizer wrapper (``optimizer`` is required)."""
        if optimizer is None:
            raise ValueError("CSER steps through an optimizer wrapper: pass register(ddp, optimizer)")
        super().register(ddp, optimizer)
        if self.model_compressor != "grbs" and self.memory.missing("agreed", list(self._named.values())):
            for p in self._named.values():  # x^ starts as the common initial model
                self.memory.set("agreed", p, p.detach().clone())
        return CSEROptimizer(optimizer, self)

    # ---- partial gradient synchronization (every step) -----------------------------------
    def _model_offsets(self) -> dict[int, int]:
        """Where each parameter starts in the model's flat parameter order (named order)."""
        if self._offsets is None:
            self._offsets, start = {}, 0
            for p in self._named.values():
                self._offsets[id(p)] = start
                start += p.numel()
            self._total = start
        return self._offsets

    def selection(self, params, step: int) -> torch.Tensor:
        """Bucket positions (CPU int64) of this step's GRBS selection.

        One selection over the whole model is drawn per step, at its first bucket, and each
        bucket takes its parameters' part: the draws do not depend on how DDP buckets the
        parameters (so a restarted run, whose DDP rebuilds its buckets again, resumes exactly).
        """
        offsets = self._model_offsets()
        if self._drawn[0] != step:
            self._drawn = (step, grbs.select(self._total, self.block_size, self.grad_ratio, self._generator))
        chosen = self._drawn[1]
        bounds = torch.tensor([[offsets[id(p)], offsets[id(p)] + p.numel()] for p in params])
        cuts = torch.searchsorted(chosen, bounds.view(-1)).tolist()  # one call; CPU tensors
        pieces, start = [], 0
        for k, p in enumerate(params):
            pieces.append(chosen[cuts[2 * k] : cuts[2 * k + 1]] - offsets[id(p)] + start)
            start += p.numel()
        return torch.cat(pieces)

    def reduce(self, bucket, step: int) -> Future:
        buf = bucket.buffer()
        if self.grad_ratio is None:
            fut: Future = Future()
            fut.set_result(buf)
            return fut
        with self.time(step, "compress", buf.device):
            idx = self.selection(bucket.parameters(), step).to(buf.device)
            bad = nonfinite(buf).to(buf.dtype).view(1)
            payload = torch.cat([grbs.gather(buf, idx), bad]).mul_(1.0 / self.world_size)
        self.count_bits(step, 8 * buf.element_size() * idx.numel())
        reduced = self.transport.all_reduce(payload, step)

        def finish(f: Future) -> torch.Tensor:
            values = f.value()
            with self.time(step, "decompress", buf.device):
                grbs.scatter(buf, idx, values[:-1])
                # a non-finite gradient on any rank reaches every rank (GradScaler skips)
                buf.masked_fill_(values[-1] != 0, float("nan"))
            return buf

        return reduced.then(finish)

    # ---- error reset (every `period` steps) -------------------------------------------------
    def reset(self, step: int) -> None:
        """Error reset with ``c_i = GRBS(e_i)``: ``x_i <- x_i - c_i + mean_j c_j``.

        Because every rank selects the same elements ``S`` and ``x_i = x^ + e_i`` with a common
        ``x^``, this is ``x_i[S] <- x^[S] + mean_j e_j[S] = mean_j x_j[S]``: partial model
        averaging, computed directly (exact when the models agree, and no copy of ``x^``).
        Other compressors: :meth:`_reset_with_codec`.
        """
        if self.model_compressor != "grbs":
            return self._reset_with_codec(step)
        params = list(self._named.values())
        starts = self._model_offsets()
        offsets = [starts[id(p)] for p in params] + [self._total]
        idx = grbs.select(self._total, self.block_size, self.model_ratio, self._generator)
        bounds = torch.searchsorted(idx, torch.tensor(offsets)).tolist()  # idx is on the CPU
        pieces = []
        with self.time(step, "compress", params[0].device):
            for k, p in enumerate(params):
                sel = idx[bounds[k] : bounds[k + 1]] - offsets[k]
                if sel.numel():
                    sel = sel.to(p.device)
                    pieces.append((p, sel, grbs.gather(p.detach().view(-1), sel)))
            payload = torch.cat([v.float() for *_, v in pieces]).mul_(1.0 / self.world_size)
        self.count_bits(step, 32 * payload.numel())
        mean = self.transport.all_reduce(payload, step).wait()
        with torch.no_grad(), self.time(step, "decompress", params[0].device):
            for (p, sel, _), values in zip(pieces, mean.split([s.numel() for _, s, _ in pieces])):
                grbs.scatter(p.view(-1), sel, values)

    def _reset_with_codec(self, step: int) -> None:
        """``c_i = C(x_i - x^)``; ``x_i <- x_i - c_i + mean_j c_j``; ``x^ <- x^ + mean_j c_j``."""
        params = list(self._named.values())
        plan = self._plans.get(params, step)
        device = params[0].device
        with torch.no_grad():
            with self.time(step, "compress", device):
                agreed = [self.memory.get("agreed", p) for p in params]
                residuals = [(p.detach() - a).reshape(-1).float() for p, a in zip(params, agreed)]
                payload, local = plan.encode(residuals, self._local, self._generator)
            self.count_bits(step, plan.paper_bits)
            gathered = self.transport.all_gather(payload, step).wait()
            with self.time(step, "decompress", device):
                means = [torch.empty_like(r) for r in residuals]
                plan.mean(gathered, means, local)
                for p, a, mean, (idx, values) in zip(params, agreed, means, local):
                    a.view(-1).add_(mean.to(a.dtype))
                    subtract_message(mean, idx, values)  # mean c - c_i
                    p.view(-1).add_(mean.to(p.dtype))

    @contextmanager
    def averaged(self):
        """Temporarily replace every local model by the mean over ranks (for evaluation or
        checkpointing); the local models are restored on exit. Traffic is not counted."""
        params = list(self._named.values())
        saved = [p.detach().clone() for p in params]
        flat = torch.cat([p.detach().reshape(-1).float() for p in params])
        dist.all_reduce(flat, group=self.process_group)
        flat.div_(self.world_size)
        with torch.no_grad():
            for p, piece in zip(params, flat.split([p.numel() for p in params])):
                p.copy_(piece.view_as(p))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

    # ---- checkpoints ---------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"generator": self._generator.get_state(), "local": self._local.get_state()}

    def load_extra_state(self, state: dict) -> None:
        self._generator.set_state(state["generator"])
        self._local.set_state(state["local"])
        self._drawn = (None, None)
        self._offsets = None


class CSEROptimizer(PeriodicSyncOptimizer):
    """Steps the local optimizer (momentum stays local), then every ``period`` steps resets."""

    def __init__(self, optimizer: torch.optim.Optimizer, hook_state: CSER) -> None:
        super().__init__(optimizer, hook_state, hook_state.period)

    def synchronize(self, step: int) -> None:
        self.hook_state.reset(step)

    def averaged(self):
        """See :meth:`CSER.averaged`."""
        return self.hook_state.averaged()
