"""EF-SGDM's worker message, error-compensated (:mod:`.error_feedback`) scaled sign: momentum,
look-ahead, error memory and the compression in as few passes as the device allows.

``m' = g + mu m`` (when there is momentum), ``v = (g + mu m' or m' or g) + rho e``, then the
blockwise scaled sign of ``v`` and the new error ``v - C(v)``: dist-EF-SGDM's worker step. On
CUDA the error term joins the compression kernel; on CPU it joins the fused momentum loop.
"""

from dataclasses import dataclass

import torch

from .._ext import cpu
from . import dispatch
from . import scaled_sign as sign
from .error_feedback import compensate


@dataclass
class WorkerBuffers:
    """fp32 buffers of one layout: the message ``v``, the new momentum, the new error."""

    v: torch.Tensor
    momentum: torch.Tensor
    error: torch.Tensor


@dataclass(frozen=True)
class Momentum:
    """The worker's momentum ``mu`` (0: none) and whether it looks ahead (Nesterov)."""

    mu: float
    nesterov: bool


def ef_input(
    g: torch.Tensor,
    momentum: torch.Tensor | None,
    how: Momentum,
    error: tuple[torch.Tensor, float | torch.Tensor] | None,
    out: WorkerBuffers,
) -> torch.Tensor:
    """``m' = g + mu m`` into ``out.momentum`` (unless ``momentum`` is None) and ``v = (g +
    mu m' or m' or g) (+ rho e)`` into ``out.v``; ``error`` is (``e``, ``rho``) or None."""
    e, rho = error if error is not None else (None, 0.0)
    if (
        not isinstance(rho, torch.Tensor)
        and g.dtype == torch.float32
        and dispatch.usable("ef_input", g, out.v, out.momentum)
    ):
        return cpu.ef_input(g, momentum, out.momentum, out.v, mu=how.mu, nesterov=how.nesterov, error=e, rho=float(rho))
    v = out.v
    if momentum is not None:
        torch.add(g, momentum, alpha=how.mu, out=out.momentum)  # m' = mu m + g
        if how.nesterov:
            torch.add(g, out.momentum, alpha=how.mu, out=v)  # g + mu m'
        else:
            v.copy_(out.momentum)
    else:
        v.copy_(g)
    if e is not None:
        compensate(v, e, rho)
    return v


def worker_message(
    g: torch.Tensor,
    memories: tuple[torch.Tensor | None, torch.Tensor],
    how: Momentum,
    rho: float | torch.Tensor,
    blocks: sign.BlockSet,
    out: WorkerBuffers,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed signs, block scales) of ``v`` for ``memories`` = (momentum or None, error);
    ``out`` receives ``v``, the new momentum and the new error ``v - C(v)``."""
    momentum, error = memories
    if not isinstance(rho, torch.Tensor) and dispatch.usable("sign_compress_ef", g, error, out.v, out.error):
        v = ef_input(g, momentum, how, None, out)
        return sign.compress_ef(v, error, float(rho), blocks, out.error)
    v = ef_input(g, momentum, how, (error, rho), out)
    return sign.compress(v, list(blocks.blocks), out.error)
