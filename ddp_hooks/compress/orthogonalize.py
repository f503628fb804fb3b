"""Orthogonalize the columns of batches of tall matrices ``P`` (``(b, n, r)``, ``r << n``), in place.

Three methods, all in fp32 and all safe on all-zero matrices (``eps`` keeps 0/0 away):

* ``"gram_schmidt"``: modified Gram-Schmidt over the ``r`` columns, batched.
* ``"cholesky_qr2"``: ``G = P^T P``, ``P <- P L^{-T}`` with ``L = chol(G + shift)``, done twice
  for orthogonality (CholeskyQR2); two passes over ``P`` and a tiny batched ``r x r`` Cholesky.
* ``"qr"``: ``torch.linalg.qr`` (Householder), the reference.

The column space, which is all PowerSGD needs (``P P^T M`` does not depend on the basis), is
the same for all three. The default is chosen by ``benchmarks/powersgd.py``.
"""

import torch

METHODS = ("gram_schmidt", "cholesky_qr2", "qr")


def _gram_schmidt(p: torch.Tensor, eps: float) -> None:
    for i in range(p.shape[-1]):
        col = p[..., i : i + 1]
        col.div_(torch.linalg.vector_norm(col, dim=-2, keepdim=True) + eps)
        if i + 1 < p.shape[-1]:
            rest = p[..., i + 1 :]
            rest.sub_(col * (col * rest).sum(dim=-2, keepdim=True))


def _cholesky_pass(p: torch.Tensor, eps: float) -> None:
    gram = p.transpose(-2, -1) @ p
    r = gram.shape[-1]
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1, keepdim=True).unsqueeze(-1)
    eye = torch.eye(r, dtype=p.dtype, device=p.device)
    # a shift relative to the matrix's own scale keeps rank-deficient P factorizable
    gram = gram + eye * (scale * 1e-6 + eps)
    chol, _ = torch.linalg.cholesky_ex(gram)
    p.copy_(torch.linalg.solve_triangular(chol, p.transpose(-2, -1), upper=False).transpose(-2, -1))


def orthogonalize(p: torch.Tensor, method: str = "gram_schmidt", eps: float = 1e-8) -> torch.Tensor:
    """Orthonormalize the columns of ``p`` (``(..., n, r)``, fp32) in place; returns ``p``."""
    if method == "gram_schmidt":
        _gram_schmidt(p, eps)
    elif method == "cholesky_qr2":
        _cholesky_pass(p, eps)
        _cholesky_pass(p, eps)
    elif method == "qr":
        p.copy_(torch.linalg.qr(p).Q)
    else:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    return p
