"""The error-feedback input of a worker: momentum, look-ahead and error memory in one pass.

``m' = g + mu m`` (when there is momentum) and ``p = (g + mu m' or m' or g) + rho e``: the
vector dist-EF-SGDM's worker compresses. On CPU the fused loop of :mod:`ddp_hooks._ext.cpu`
computes it in one pass (same floats as the torch operations below).
"""

import torch

from .._ext import cpu


def ef_input(
    g: torch.Tensor,
    momentum: torch.Tensor | None,
    *,
    mu: float,
    nesterov: bool,
    error: torch.Tensor,
    rho: float | torch.Tensor,
    momentum_out: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Writes ``m'`` into ``momentum_out`` (unless ``momentum`` is None) and ``p`` into ``out``;
    ``rho`` is a float or a per-element tensor. Returns ``out``."""
    if not torch.is_tensor(rho) and g.dtype == torch.float32 and cpu.usable(g, error, out, momentum_out):
        return cpu.ef_input(g, momentum, momentum_out, out, mu=mu, nesterov=nesterov, error=error, rho=float(rho))
    if momentum is not None:
        torch.add(g, momentum, alpha=mu, out=momentum_out)  # m' = mu m + g
        if nesterov:
            torch.add(g, momentum_out, alpha=mu, out=out)  # g + mu m'
        else:
            out.copy_(momentum_out)
    else:
        out.copy_(g)
    if torch.is_tensor(rho):
        out.addcmul_(error, rho)
    else:
        out.add_(error, alpha=rho)
    return out
