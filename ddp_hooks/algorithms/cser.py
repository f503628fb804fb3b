"""CSER: communication-efficient SGD with error reset (Xie et al., NeurIPS 2020;
docs/algorithms.md, "CSER"), with GRBS as the compressor.

Every worker keeps its own model ``x_i = x^ + e_i``: ``x^`` is the model all ranks agree on,
``e_i`` the local residual (neither is stored: only ``x_i`` is). Per step::

    partial gradient sync (the hook):  g_i[S1] <- mean_j g_j[S1]   S1 = GRBS(grad_ratio) over the
                                       model, drawn once per step from a shared generator
                                       the rest of g_i stays local, the user's optimizer steps
                                       (local momentum: M-CSER), so local models bifurcate
    every `period` steps, error reset: c_i = C(e_i)                 C = GRBS(model_ratio)
    (after the optimizer's step)       x_i <- x_i - c_i + mean_j c_j ;  x^ <- x^ + mean_j c_j

With GRBS the reset is partial model averaging on the selected blocks. Special cases:
``grad_ratio=None`` (no gradient sync) with ``period=1`` is CSEA, with ``period=H`` CSER-PL;
``grad_ratio=1`` and ``model_ratio=1`` is synchronous SGD. The overall compression ratio is
``RC = 1 / (1 / (model_ratio * period) + 1 / grad_ratio)`` (:func:`overall_ratio`).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.futures import Future
from typing_extensions import Unpack

from ..comm import chain
from ..compress import grbs
from ..compress.error_feedback import residual
from ..compress.sparse import KINDS
from ..compress.sparse_plan import MessagePlan
from ..core import (
    SEED,
    Bucket,
    Choice,
    Float,
    Generators,
    HookState,
    Int,
    Maybe,
    Runtime,
    Settings,
    add_unless,
    keep_unless,
    nonfinite,
    poison,
    setting,
    split_flag,
    with_flag,
)
from ..core.layouts import LayoutCache
from ..core.model import flat_param
from .cser_ratio import overall_ratio, propose
from .local import LocalSteps

#: reset compressors besides GRBS (the sparse/quantized codecs; residuals tracked explicitly)
RESET_CODECS = tuple(k for k in KINDS if k != "grbs")

__all__ = ["CSER", "RESET_CODECS", "overall_ratio", "propose"]


@dataclass(frozen=True, kw_only=True)
class CSERSettings(Settings):
    """CSER's hyper-parameters."""

    grad_ratio: float | None = setting(
        64.0, Maybe(Float(1.0)), "GRBS ratio of the every-step gradient sync (None: no gradient sync)."
    )
    model_ratio: float = setting(4.0, Float(1.0), "ratio of the error reset (1 resets the residual completely).")
    period: int = setting(16, Int(1), "steps ``H`` between error resets.")
    block_size: int = setting(256, Int(1), "GRBS block size in elements.")
    model_compressor: str = setting(
        "grbs",
        Choice(("grbs", *RESET_CODECS)),
        '``"grbs"``: the reset is partial model averaging; the others (keeping ``1 / model_ratio`` of each '
        "tensor where they sparsify) track the residual ``e_i = x_i - x^`` against an explicitly stored "
        "agreed model ``x^`` (one more copy of the model) and all-gather their fixed-size payloads.",
    )
    levels: int = setting(16, Int(1, 255), "quantization levels for ``qtopk`` / ``qsgd``.")
    seed: int = setting(0, SEED, "seed of the generator shared by all ranks (independent of the global RNG).")


class CSER(LocalSteps, HookState):
    """CSER state: the partial-gradient-sync hook and the error reset after optimizer steps.

    ``state = ddp_hooks.CSER(grad_ratio=64, model_ratio=4, period=16).register(ddp, optimizer)``;
    ``state.averaged()`` averages the local models for evaluation or checkpointing.
    """

    settings_type = CSERSettings
    settings: CSERSettings

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
        **runtime: Unpack[Runtime],
    ) -> None:
        settings = CSERSettings.of(locals())
        super().__init__(settings, **runtime)
        self._offsets: dict[int, int] | None = None  # each parameter's start in the model order
        self._total = 0
        self._drawn: tuple[int | None, torch.Tensor | None] = (None, None)
        self.rng = Generators(self.settings.seed)
        keep = 1.0 / self.settings.model_ratio
        self._plans = LayoutCache(
            lambda params: MessagePlan(
                params, self.settings.model_compressor, keep if keep < 1 else 2**31 - 1, self.settings.levels
            )
        )

    @property
    def sync_every(self) -> int:
        return self.settings.period

    def needs_last_bucket(self) -> bool:
        return self.settings.grad_ratio is None  # local phases agree on finiteness at the last bucket

    def on_bind(self) -> None:
        self.rng.bind(self.rank)

    def on_attach(self) -> None:
        if self.settings.model_compressor != "grbs":
            for p in self.served_params():  # x^ starts as the common initial model
                if self.memory.get("agreed", p) is None:
                    self.memory.set("agreed", p, p)

    def memory_numel(self, slot: str, param: torch.Tensor) -> int | None:
        return param.numel() if slot == "agreed" and self.settings.model_compressor != "grbs" else None

    @classmethod
    def csea(cls, ratio: float, **kwargs: Any) -> "CSER":
        """CSEA: no gradient sync, a partial model sync (error reset) every step."""
        return cls(grad_ratio=None, model_ratio=ratio, period=1, **kwargs)

    @classmethod
    def partial_local_sgd(cls, model_ratio: float, period: int, **kwargs: Any) -> "CSER":
        """CSER-PL: local SGD with a partial model sync every ``period`` steps."""
        return cls(grad_ratio=None, model_ratio=model_ratio, period=period, **kwargs)

    @property
    def ratio(self) -> float:
        """The overall compression ratio RC of this configuration."""
        return overall_ratio(self.settings.grad_ratio, self.settings.model_ratio, self.settings.period)

    # ---- partial gradient synchronization (every step) -----------------------------------
    def _model_offsets(self) -> dict[int, int]:
        """Where each parameter starts in the model's flat parameter order (named order)."""
        if self._offsets is None:
            self._offsets, start = {}, 0
            for p in self.model_view().params:
                self._offsets[id(p)] = start
                start += p.numel()
            self._total = start
        return self._offsets

    def selection(self, params: list[torch.Tensor], step: int) -> torch.Tensor:
        """Bucket positions (CPU int64) of this step's GRBS selection.

        One selection over the whole model is drawn per step, at its first bucket, and each
        bucket takes its parameters' part: the draws do not depend on how DDP buckets the
        parameters (so a restarted run, whose DDP rebuilds its buckets again, resumes exactly).
        """
        offsets = self._model_offsets()
        if self._drawn[0] != step:
            self._drawn = (
                step,
                grbs.select(self._total, self.settings.block_size, self.settings.grad_ratio or 1.0, self.rng.shared),
            )
        chosen = self._drawn[1]
        assert chosen is not None
        cuts = grbs.cuts(chosen, [b for p in params for b in (offsets[id(p)], offsets[id(p)] + p.numel())])
        pieces, start = [], 0
        for k, p in enumerate(params):
            pieces.append(chosen[cuts[2 * k] : cuts[2 * k + 1]] - offsets[id(p)] + start)
            start += p.numel()
        return torch.cat(pieces)

    def reduce(self, bucket: Bucket, step: int) -> Future[torch.Tensor]:
        if self.settings.grad_ratio is None:
            return self.keep_local(bucket, step)
        buf = bucket.buffer
        with self.time(step, "compress", buf.device):
            idx = self.selection(bucket.params, step).to(buf.device, non_blocking=True)  # no sync
            payload = with_flag(grbs.gather(buf, idx), nonfinite(buf)).mul_(1.0 / self.world_size)
        self.count_bits(step, 8 * buf.element_size() * idx.numel())

        def finish(message: torch.Tensor) -> torch.Tensor:
            values, bad = split_flag(message)
            with self.time(step, "decompress", buf.device):
                grbs.scatter(buf, idx, values)
                return poison(buf, bad)

        return chain(self.transport.all_reduce(payload, step), finish)

    # ---- error reset (every `period` optimizer steps) ---------------------------------------
    def synchronize(self, step: int) -> None:
        """Error reset with ``c_i = GRBS(e_i)``: ``x_i <- x_i - c_i + mean_j c_j``.

        Because every rank selects the same elements ``S`` and ``x_i = x^ + e_i`` with a common
        ``x^``, this is ``x_i[S] <- mean_j x_j[S]``: partial model averaging, computed directly.
        If any rank's model is not finite, nothing changes anywhere.
        """
        if self.settings.model_compressor != "grbs":
            return self._reset_with_codec(step)
        params = self.served_params()
        starts = self._model_offsets()
        idx = grbs.select(self._total, self.settings.block_size, self.settings.model_ratio, self.rng.shared)
        bounds = grbs.cuts(idx, [b for p in params for b in (starts[id(p)], starts[id(p)] + p.numel())])
        pieces = []
        with self.time(step, "compress", params[0].device):
            for k, p in enumerate(params):
                sel = idx[bounds[2 * k] : bounds[2 * k + 1]] - starts[id(p)]
                if sel.numel():
                    sel = sel.to(p.device, non_blocking=True)
                    pieces.append((p, sel, grbs.gather(p.detach().reshape(-1), sel).float()))
            values = torch.cat([v for *_, v in pieces])
            payload = with_flag(values, nonfinite(values)).mul_(1.0 / self.world_size)
        self.count_bits(step, 32 * values.numel())
        # bad: some rank's model is not finite
        mean, bad = split_flag(self.transport.all_reduce(payload, step).wait())
        with torch.no_grad(), self.time(step, "decompress", params[0].device):
            for (p, sel, current), piece in zip(pieces, mean.split([s.numel() for _, s, _ in pieces])):
                with flat_param(p) as flat:
                    grbs.scatter(flat, sel, keep_unless(bad, current, piece))  # no reset anywhere if bad

    def _reset_with_codec(self, step: int) -> None:
        """``c_i = C(x_i - x^)``; ``x_i <- x_i - c_i + mean_j c_j``; ``x^ <- x^ + mean_j c_j``."""
        params = self.served_params()
        plan = self._plans.get(params, step)
        device = params[0].device
        with torch.no_grad():
            with self.time(step, "compress", device):
                agreed = [self._agreed_of(p) for p in params]
                residuals = [p.detach().reshape(-1).float() - a for p, a in zip(params, agreed)]
                payload, local = plan.encode(residuals, self.rng.own, self.rng.shared)
            self.count_bits(step, plan.paper_bits)
            gathered = self.transport.all_gather(payload, step).wait()
            with self.time(step, "decompress", device):
                means = [torch.empty_like(r) for r in residuals]
                bad = plan.mean(gathered, means, local)  # some rank's model is not finite: no reset
                for p, a, mean, (idx, values) in zip(params, agreed, means, local):
                    add_unless(bad, a, mean)
                    residual(mean, values, idx)  # mean c - c_i
                    with flat_param(p) as flat:
                        add_unless(bad, flat, mean.to(p.dtype))

    def _agreed_of(self, param: torch.Tensor) -> torch.Tensor:
        agreed = self.memory.get("agreed", param)
        assert agreed is not None  # stored for every parameter at attach
        return agreed

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """Temporarily replace every local model by the mean over ranks (for evaluation or
        checkpointing); the local models are restored on exit. Counted in ``stats()``."""
        params = self.model_view().params
        saved = [p.detach().clone() for p in params]
        flat = torch.cat([p.detach().reshape(-1).float() for p in params]).mul_(1.0 / self.world_size)
        self.transport.all_reduce(flat, max(0, self.step - 1)).wait()
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
    def extra_state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.state_dict(), **self.local_state_dict()}

    def extra_problems(self, extra: Any) -> list[str]:
        return Generators.problems(extra.get("rng")) + self.local_problems(extra)

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.load_state_dict(state["rng"])
        self.load_local_state_dict(state)
        self._drawn = (None, None)
        self._offsets = None
