"""Error feedback: the one primitive every error-compensated compressor is made of.

    v = x + rho e        compensate: the input plus the (rescaled) error memory
    q = C(v)             the compressor's own step
    e = v - q            residual: what the message left out becomes the memory

:func:`compensate` and :func:`residual` are its two halves in torch; every error-compensated
path of the library goes through them (the scaled sign's :func:`~.scaled_sign.compress_ef`
and the EF-SGDM worker's message, the sparse and quantized codecs'
:meth:`~.sparse.Codec.encode_ef`, PowerSGD's ``M = g + e`` and ``e = M - M^``, CSER's reset).
The fused kernels compute the three steps in one pass and are checked against these.
"""

import torch


def compensate(
    x: torch.Tensor, error: torch.Tensor, rho: float | torch.Tensor = 1.0, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``v = x + rho * error`` into ``out`` (``x`` itself when None); ``rho`` is a float or one
    factor per element (the learning-rate ratio of each block)."""
    if isinstance(rho, torch.Tensor):
        if out is not None and out is not x:
            out.copy_(x)
            x = out
        return x.addcmul_(error, rho)
    return torch.add(x, error, alpha=rho, out=x if out is None else out)


def residual(v: torch.Tensor, q: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    """``v -= q`` in place, so that ``v`` holds the new error: ``q`` dense, or the values of a
    sparse message at the indices ``idx`` (unique within a message)."""
    if idx is None:
        return v.sub_(q)
    return v.index_add_(0, idx, q, alpha=-1.0)
