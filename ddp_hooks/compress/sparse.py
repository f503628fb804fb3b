"""Sparsifiers and quantizers with fixed-size byte payloads (Qsparse-local-SGD's operators).

Per tensor (flattened, ``d`` elements, ``k`` kept):

* ``topk``: the ``k`` largest magnitudes, sent as int32 indices + fp32 values.
* ``randk``: ``k`` indices drawn uniformly (per-worker generator), int32 indices + fp32 values.
* ``grbs``: ``k`` indices drawn from a generator every rank shares (GRBS with one-element
  blocks), so the indices need not travel: fp32 values only.
* ``signtopk``: top-k, each kept value replaced by ``(||v_k||_1 / k) * sgn`` (sgn(0) = +1):
  int32 indices + packed signs + one fp32 scale.
* ``qtopk``: top-k, then the s-level stochastic quantizer on the kept values, divided by
  ``1 + beta`` with ``beta = min(k / s^2, sqrt(k) / s)``: int32 indices + uint8 levels + packed
  signs + one fp32 norm.
* ``sign``: scaled sign of the whole tensor, ``(||v||_1 / d) * sgn`` (EF-signSGD's operator).
* ``qsgd``: the s-level stochastic quantizer of the whole tensor (unbiased):
  ``Q(v)_i = ||v||_2 * sgn(v_i) * xi_i / s`` with ``xi_i`` = ``floor(s|v_i|/||v||)`` rounded up
  with probability equal to the remainder.
* ``int8`` / ``2bit``: the uniform ``b``-bit quantizer of the whole tensor (``b`` = 8 or 2):
  ``2^b`` levels evenly spaced over ``[-m, m]``, ``m = max |v|``, each element rounded to the
  nearest (deterministic, biased; error feedback carries the rest): packed codes + one fp32 ``m``.
* ``topk-int8`` / ``topk-2bit``: top-k, then that quantizer on the kept values (SparseLoCo's
  2-bit top-k): int32 indices + packed codes + one fp32 ``m``.
* ``none``: the tensor itself, fp32 (no compression; its error is always zero).

Payload sizes follow from ``(d, k, s)`` only, never from the data. :meth:`Codec.paper_bits` is
what the Qsparse paper counts: index bits ``ceil(log2 d)``, 1 sign bit, ``ceil(log2(s+1))``
level bits, ``b`` bits per uniform code, 32 bits per value or scale (docs/algorithms.md, "Qsparse").
"""

import math

import torch

from .._ext import cuda
from . import dispatch
from .bits import ByteLayout, bytes_as, pack_codes, pack_signs, unpack_codes, unpack_signs
from .error_feedback import compensate, residual

KINDS = ("topk", "randk", "grbs", "signtopk", "qtopk", "sign", "qsgd", "int8", "2bit", "topk-int8", "topk-2bit", "none")
UNIFORM_BITS = {"int8": 8, "2bit": 2, "topk-int8": 8, "topk-2bit": 2}  # the uniform quantizers' code bits
_DENSE = ("sign", "qsgd", "int8", "2bit", "none")
_FUSED = ("topk", "signtopk")  # top-k with error feedback in one CUDA kernel when it is loaded
Encoded = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]  # payload, indices or None, values


def keep_count(numel: int, k: int | float) -> int:
    """Elements kept of a tensor: ``k`` as a count (int) or a fraction of ``numel`` (float < 1)."""
    if isinstance(k, float) and k < 1:
        return min(numel, max(1, math.ceil(k * numel)))
    return min(numel, int(k))


def top_indices(v: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest magnitudes of a 1-D tensor (exact, as ``torch.topk``)."""
    return torch.topk(v.abs(), k, sorted=False).indices


def sign_scale(kept: torch.Tensor, k: int) -> torch.Tensor:
    """``||kept||_1 / k`` in fp32, summed in fp64 (SignTopK's and EF-signSGD's scale)."""
    return kept.abs().sum(dtype=torch.float64).div(k).to(torch.float32)


def stochastic_levels(magnitude: torch.Tensor, s: int, noise: torch.Tensor) -> torch.Tensor:
    """``floor(s * magnitude) + (noise < remainder)``: unbiased integer levels in [0, s].
    ``magnitude`` is ``|v| / ||v||`` in [0, 1]; ``noise`` uniform in [0, 1)."""
    scaled = magnitude * s
    low = scaled.floor()
    return (low + (noise < scaled - low).to(scaled.dtype)).clamp_(0, s)


def quantize(v: torch.Tensor, s: int, noise: torch.Tensor) -> torch.Tensor:
    """The s-level stochastic quantizer (dense, unbiased): ``||v|| sgn(v) xi / s``."""
    norm = torch.linalg.vector_norm(v)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    levels = stochastic_levels(v.abs() / safe, s, noise)
    quantized: torch.Tensor = torch.where(v >= 0, 1.0, -1.0) * levels * (norm / s)
    return quantized


def uniform_codes(v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest of ``2^bits`` levels evenly spaced over ``[-m, m]``, ``m = max |v|``: (uint8
    codes, ``m`` as a 1-element fp32 tensor)."""
    top = 2**bits - 1
    scale = v.abs().amax().reshape(1) if v.numel() else v.new_zeros(1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = ((v / safe + 1.0) * (top / 2)).round_().clamp_(0, top).to(torch.uint8)
    return codes, scale


def uniform_values(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The values of :func:`uniform_codes`' codes (any leading shape; ``scale`` broadcasts)."""
    values: torch.Tensor = (codes.to(torch.float32) * (2.0 / (2**bits - 1)) - 1.0) * scale
    return values


def qtopk_beta(k: int, s: int) -> float:
    return min(k / s**2, math.sqrt(k) / s)


class Codec:
    """Fixed-size encoding of one flattened tensor of ``numel`` elements."""

    def __init__(self, kind: str, numel: int, k: int | float = 1000, levels: int = 16) -> None:
        if kind not in KINDS:
            raise ValueError(f"compressor must be one of {list(KINDS)}, got {kind!r}")
        self.kind, self.numel, self.s = kind, numel, levels
        self.k = numel if kind in _DENSE else keep_count(numel, k)
        sizes = {"idx": 4 * self.k} if kind not in _DENSE and kind != "grbs" else {}
        if kind in ("topk", "randk", "grbs", "none"):
            sizes["values"] = 4 * self.k
        if kind in ("signtopk", "qtopk", "sign", "qsgd"):
            sizes["signs"] = -(-self.k // 8)
            sizes["scale"] = 4
        if kind in ("qtopk", "qsgd"):
            sizes["levels"] = self.k
        self.bits = UNIFORM_BITS.get(kind, 0)
        if self.bits:
            sizes["codes"] = -(-self.k * self.bits // 8)
            sizes["scale"] = 4
        self.layout = ByteLayout(sizes)
        self.nbytes = self.layout.nbytes

    # ---- paper accounting ------------------------------------------------------------------
    def paper_bits(self) -> int:
        d, k = self.numel, self.k
        index = 0 if k >= d else math.ceil(math.log2(max(d, 2)))
        level = math.ceil(math.log2(self.s + 1))
        return {
            "topk": k * (32 + index),
            "randk": k * (32 + index),
            "grbs": 32 * k,
            "signtopk": k * (1 + index) + 32,
            "qtopk": k * (1 + level + index) + 32,
            "sign": d + 32,
            "qsgd": d * (1 + level) + 32,
            "none": 32 * d,
        }.get(self.kind, k * (self.bits + index) + 32)

    # ---- encode -----------------------------------------------------------------------------
    def encode(self, v: torch.Tensor, generator: torch.Generator | None = None) -> Encoded:
        """Compress fp32 ``v`` (``numel``,): (payload uint8, indices or None, values), where
        ``values`` at the indices is the decompressed message (what the receivers will add).
        ``generator`` is this rank's (randk, stochastic rounding) or, for grbs, the shared one."""
        idx = self._select(v, generator)
        kept = v if idx is None else v[idx]
        fields, values = self._values(kept, generator)
        if idx is not None and self.kind != "grbs":
            fields["idx"] = idx.to(torch.int32)
        return self.layout.join(fields), idx, values

    def encode_ef(self, p: torch.Tensor, e: torch.Tensor, generator: torch.Generator | None = None) -> Encoded:
        """Error-compensated: compress ``v = p + e`` and leave ``e = v - q`` (in place). Top-k
        and SignTopK of CUDA tensors run as one kernel when the extension is loaded."""
        if self.kind in _FUSED and dispatch.usable("topk_ef", p, e):
            top, kept = cuda.topk_ef(p, e, self.k, sign=self.kind == "signtopk")
            fields = {"idx": top.to(torch.int32), "values": kept}
            if self.kind == "signtopk":
                fields = {"idx": fields["idx"], "signs": pack_signs(kept), "scale": kept.abs()[:1]}
            return self.layout.join(fields), top, kept
        payload, idx, values = self.encode(compensate(p, e, out=e), generator)  # v = p + e
        residual(e, values, idx)
        return payload, idx, values

    def _select(self, v: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor | None:
        if self.kind in _DENSE:
            return None
        if self.kind in ("randk", "grbs"):
            drawn = torch.randperm(self.numel, generator=generator)[: self.k].sort().values
            return drawn.to(v.device, non_blocking=True)  # drawn on the host; no sync
        return top_indices(v, self.k)

    def _values(
        self, kept: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The payload fields of the kept values, and the values the receivers will add."""
        if self.kind in ("topk", "randk", "grbs", "none"):
            values = kept.clone()
            return {"values": values}, values
        if self.kind in ("signtopk", "sign"):
            scale = sign_scale(kept, self.k)
            return {"signs": pack_signs(kept), "scale": scale.view(1)}, torch.where(kept >= 0, scale, -scale)
        if self.bits:
            codes, scale = uniform_codes(kept, self.bits)
            packed = codes if self.bits == 8 else pack_codes(codes, self.bits)
            return {"codes": packed, "scale": scale}, uniform_values(codes, scale, self.bits)
        noise = torch.rand(self.k, generator=generator).to(kept.device, non_blocking=True)  # qtopk, qsgd
        norm = torch.linalg.vector_norm(kept)
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        levels = stochastic_levels(kept.abs() / safe, self.s, noise)
        unit = norm / self.s
        if self.kind == "qtopk":
            unit = unit / (1 + qtopk_beta(self.k, self.s))
        fields = {"signs": pack_signs(kept), "scale": unit.view(1), "levels": levels.to(torch.uint8)}
        return fields, torch.where(kept >= 0, 1.0, -1.0) * levels * unit

    # ---- decode -----------------------------------------------------------------------------
    def decode(
        self, payload: torch.Tensor, shared_idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(n, nbytes)`` payloads -> (indices ``(n, k)`` int64 or None for dense, values
        ``(n, k)``). For ``grbs`` the indices are this rank's own (``shared_idx``)."""
        n = payload.shape[0]
        parts = {name: self.layout.field(payload, name) for name in self.layout.spans}
        idx = None
        if "idx" in parts:
            idx = bytes_as(parts["idx"], torch.int32).to(torch.int64).view(n, self.k)
        elif self.kind == "grbs":
            assert shared_idx is not None, "grbs decodes with the shared indices"
            idx = shared_idx.expand(n, self.k)
        if "values" in parts:
            return idx, bytes_as(parts["values"], torch.float32).view(n, self.k)
        scale = bytes_as(parts["scale"], torch.float32)  # (n, 1)
        if self.bits:
            codes = parts["codes"] if self.bits == 8 else unpack_codes(parts["codes"], self.k, self.bits)
            return idx, uniform_values(codes, scale, self.bits)
        signs = unpack_signs(parts["signs"], self.k)
        if "levels" in parts:
            signs = signs * parts["levels"].to(torch.float32)
        return idx, signs * scale
