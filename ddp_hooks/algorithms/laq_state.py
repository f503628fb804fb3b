"""LAQ's settings, and its per-worker scalars: the clock, the last upload's error, the
model-change history.

Norms and the history are kept in float64: a very large gradient or model change must not
overflow the rule's arithmetic (squares of fp32 values reach past fp32's range).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..compress.laq import model_change
from ..core import Choice, Flag, Float, Held, Int, Maybe, Settings, poison, setting

_SCALARS = ("eps2_last", "clock", "changes", "uploads", "uploads_all")


@dataclass(frozen=True, kw_only=True)
class LAQSettings(Settings):
    """LAQ's hyper-parameters. The defaults (SLAQ's rule, a short ``t_bar``) train on a DDP
    script's minibatch gradients; :meth:`LAQ.paper` is the paper's full-gradient LAQ."""

    bits: int = setting(4, Int(1, 8), "code width ``b``.")
    memory_depth: int = setting(10, Int(1, 10_000), "``D``, how many past model changes the rule weighs.")
    xi: float | None = setting(
        None,
        Maybe(Float(0.0)),
        "weight ``xi_d`` of each of them (None: ``0.8 / D``); while fewer than ``D`` changes exist, "
        "their mean is weighted by ``xi * D`` (as the authors' code does).",
    )
    max_staleness: int = setting(
        10,
        Int(1, 2**24),
        "``t_bar``, an upload is forced after this many silent rounds (the paper's 100 can stall a "
        "minibatch run). A worker's first round always uploads: the 2^b-point grid has no point at 0, "
        "so its error can exceed the innovation.",
    )
    quantize: bool = setting(True, Flag(), "quantize the innovation (False: LAG, full precision).")
    skip: bool = setting(True, Flag(), "apply the skip rule (False: QGD, upload every round).")
    error_weight: float = setting(
        1.5, Float(0.0), "factor on ``eps2 + eps2_last`` (1.5, SLAQ's; 3 for full-gradient LAQ)."
    )
    threshold_offset: float = setting(
        0.2, Float(0.0), "constant added to the threshold (0.2, SLAQ's; 0 for full-gradient LAQ)."
    )
    wire: str = setting(
        "uploads",
        Choice(("dense", "uploads")),
        '``"uploads"``: broadcast only the uploaders\' payloads (the bytes the paper counts; the flags '
        'are read on the host); ``"dense"``: all-reduce every innovation, no host sync, fp32 bytes.',
    )

    @property
    def weight(self) -> float:
        """``xi``, resolved."""
        return 0.8 / self.memory_depth if self.xi is None else self.xi

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "xi": self.weight}


class LAQMemory:
    """The skip rule's memory of one worker, and the fp32 workspaces of its round."""

    def __init__(self, depth: int, max_staleness: int) -> None:
        self.depth = depth
        self.max_staleness = max_staleness
        self.changes = 0  # model changes recorded so far (capped at depth)
        self.scalars: dict[str, torch.Tensor] | None = None
        self._ws: dict[str, torch.Tensor] | None = None

    def _scalars(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self.scalars is None:
            f64 = torch.float64
            self.scalars = {
                "eps2_last": torch.zeros((), dtype=f64, device=device),
                # rounds since the last upload; a worker that never uploaded counts as t_bar
                # stale, so round 0 uploads everywhere
                "clock": torch.full((), float(self.max_staleness), dtype=f64, device=device),
                "changes": torch.zeros(self.depth, dtype=f64, device=device),  # ring, newest first
                "uploads": torch.zeros((), dtype=f64, device=device),
                "uploads_all": torch.zeros((), dtype=f64, device=device),
            }
        return self.scalars

    def workspace(self, numel: int, device: torch.device, codes_only: bool) -> dict[str, torch.Tensor]:
        """fp32 buffers of the model's size: the gradient, and either the codes (uploads mode:
        only the codes travel) or ``Q_new`` and the innovation."""
        self._scalars(device)
        ws = self._ws
        if ws is None or ws["g"].numel() != numel or ws["g"].device != device:
            ws = {"g": torch.empty(numel, device=device)}
            if codes_only:
                ws["codes"] = torch.empty(numel, dtype=torch.uint8, device=device)
            else:
                ws["q_new"] = torch.empty(numel, device=device)
                ws["innovation"] = torch.empty(numel, device=device)
            self._ws = ws
        return ws

    @property
    def eps2_last(self) -> torch.Tensor:
        assert self.scalars is not None
        return self.scalars["eps2_last"]

    def threshold(self, xi: float, lr: float, error_term: torch.Tensor) -> torch.Tensor:
        """``(xi D / min(k, D)) sum_d ||dtheta_d||^2 / lr^2 + error_term`` (0 history at k = 0)."""
        assert self.scalars is not None
        weight = xi * self.depth / max(1, self.changes)
        return weight * self.scalars["changes"].sum() / (lr * lr if lr > 0 else 1.0) + error_term

    def stale(self) -> torch.Tensor:
        assert self.scalars is not None
        return self.scalars["clock"] >= self.max_staleness

    def after_round(self, uploaded: torch.Tensor, error2: torch.Tensor) -> None:
        """An uploader's clock restarts and its error is remembered; others age by one round."""
        s = self.scalars
        assert s is not None
        s["eps2_last"] = torch.where(uploaded, error2.to(s["eps2_last"].dtype), s["eps2_last"])
        s["clock"] = torch.where(uploaded, torch.zeros_like(s["clock"]), s["clock"] + 1)

    def count(self, uploaded: torch.Tensor, everyone: torch.Tensor, bad: torch.Tensor) -> None:
        s = self.scalars
        assert s is not None
        s["uploads"] += (uploaded & ~bad).to(s["uploads"].dtype)
        s["uploads_all"] += torch.where(bad, 0, everyone.to(torch.float64).sum()).to(s["uploads_all"].dtype)

    def record_change(
        self,
        params: list[torch.Tensor],
        theta_prev: torch.Tensor,
        combine: Callable[[torch.Tensor], torch.Tensor] = lambda change: change,
    ) -> None:
        """``||theta_new - theta_prev||^2`` into the history, and ``theta_prev = theta_new``;
        ``combine`` sums the parts of a model that several ranks serve."""
        s = self._scalars(theta_prev.device)
        s["changes"] = torch.roll(s["changes"], 1)
        s["changes"][0] = combine(model_change(params, theta_prev))
        self.changes = min(self.depth, self.changes + 1)

    def upload_counts(self) -> tuple[int, int]:
        if self.scalars is None:
            return 0, 0
        return int(self.scalars["uploads"].item()), int(self.scalars["uploads_all"].item())

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        scalars = None if self.scalars is None else {k: v.clone() for k, v in self.scalars.items()}
        return {"scalars": scalars, "changes": self.changes}

    def problems(self, extra: Any) -> list[str]:
        changes, scalars = extra.get("changes"), extra.get("scalars", "<missing>")
        out = []
        if isinstance(changes, bool) or not isinstance(changes, int) or not 0 <= changes <= self.depth:
            out.append(f"extra['changes'] must be an int in [0, {self.depth}], got {changes!r}")
        if scalars is None:
            return out
        if not isinstance(scalars, dict) or set(scalars) != set(_SCALARS):
            return out + [f"extra['scalars'] must hold {list(_SCALARS)}"]
        for key, value in scalars.items():
            size = self.depth if key == "changes" else 1
            if not torch.is_tensor(value) or value.numel() != size or not bool(torch.isfinite(value).all()):
                out.append(f"extra['scalars'][{key!r}] must be a finite tensor of {size} element(s)")
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scalars = state["scalars"]
        self.scalars = None if scalars is None else {k: v.clone().to(torch.float64) for k, v in scalars.items()}
        self.changes = int(state["changes"])


def write_mean(held: list[Held], aggregate: torch.Tensor, workers: int, bad: torch.Tensor) -> None:
    """Every held bucket of the step becomes its part of ``aggregate / workers`` (NaN if ``bad``)."""
    start = 0
    for h in held:
        piece = aggregate[start : start + h.buffer.numel()]
        start += h.buffer.numel()
        if h.buffer.dtype == torch.float32:
            torch.div(piece, workers, out=h.buffer)
        else:
            h.buffer.copy_(piece.div(workers))
        poison(h.buffer, bad)
