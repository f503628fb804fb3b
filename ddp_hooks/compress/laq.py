"""LAQ's innovation quantizer and b-bit code packing (ALGORITHMS.md section 5b).

With reference ``q_ref`` (the last uploaded quantized gradient) and ``tau = 1 / (2^b - 1)``::

    R    = ||g - q_ref||_inf
    code = floor((g - q_ref + R) / (2 tau R) + 1/2)      in {0, ..., 2^b - 1}
    Q(g) = q_ref - R + 2 tau R code                      so |g_i - Q(g)_i| <= tau R

``R = 0`` (nothing changed) gives ``Q(g) = q_ref`` and codes of 0, with no division by zero.
Codes are packed ``b`` bits each, least significant bit first, into bytes.
"""

import torch

from .. import native
from .sign import pack_bits, unpack_bits


def quantize_innovation(g: torch.Tensor, q_ref: torch.Tensor, bits: int):
    """(radius ``R`` as a 0-d fp32 tensor, uint8 codes, the dequantized ``Q(g)``)."""
    levels = (1 << bits) - 1
    diff = g - q_ref
    radius = diff.abs().max() if diff.numel() else diff.new_zeros(())
    safe = torch.where(radius > 0, radius, torch.ones_like(radius))
    step = 2 * safe / levels  # 2 tau R
    codes = torch.floor((diff + radius) / step + 0.5).clamp_(0, levels)
    codes = torch.where(radius > 0, codes, torch.zeros_like(codes))
    return radius, codes.to(torch.uint8), dequantize(q_ref, radius, codes, bits)


def quantize_innovation_(g: torch.Tensor, q_ref: torch.Tensor, bits: int, out: torch.Tensor, work: torch.Tensor):
    """:func:`quantize_innovation` without bucket-sized temporaries: writes ``Q(g)`` into ``out``
    (``work`` is scratch of the same size) and returns the radius; :func:`codes_of` recovers
    the codes when they must travel."""
    levels = (1 << bits) - 1
    torch.sub(g, q_ref, out=work)
    radius = torch.linalg.vector_norm(work, float("inf"))
    safe = torch.where(radius > 0, radius, torch.ones_like(radius))
    step = 2 * safe / levels
    torch.add(work, radius, out=out)
    out.div_(step).add_(0.5).floor_().clamp_(0, levels).mul_(radius > 0)  # the codes
    out.mul_(2 * radius / levels).add_(q_ref).sub_(radius)  # q_ref - R + 2 tau R code
    return radius


def quantize_step(g: torch.Tensor, q_ref: torch.Tensor, bits: int, q_new: torch.Tensor | None,
                  innovation: torch.Tensor | None, codes: torch.Tensor | None = None):
    """One round of the quantizer with what the skip rule needs: writes ``q_new = Q(g)``,
    ``innovation = q_new - q_ref`` and the uint8 ``codes``, each only if given (not None);
    returns (radius, ``||g - q_new||^2``, ``||innovation||^2``) as 0-d fp32 tensors. On CPU the
    fused loops of :mod:`ddp_hooks.native` do it in two passes (the same ``Q(g)``; norms summed
    in float64) and skip what is not asked for: with only the codes, :func:`apply_codes` gives
    ``Q(g)`` later, for the rounds that need it."""
    given = tuple(t for t in (q_new, innovation, codes) if t is not None)
    if g.dtype == torch.float32 and native.usable(g, q_ref, *given):
        levels = (1 << bits) - 1
        radius = torch.tensor(native.absmax_diff(g, q_ref) if g.numel() else 0.0)
        safe = torch.where(radius > 0, radius, torch.ones_like(radius))
        step, unit = 2 * safe / levels, 2 * radius / levels  # as the torch path rounds them
        eps2, inno2 = native.laq_quantize(g, q_ref, radius.item(), step.item(), unit.item(), levels, q_new,
                                          innovation, codes)
        return radius, torch.tensor(eps2, dtype=torch.float32), torch.tensor(inno2, dtype=torch.float32)
    q_new = torch.empty_like(g) if q_new is None else q_new
    innovation = torch.empty_like(g) if innovation is None else innovation
    radius = quantize_innovation_(g, q_ref, bits, out=q_new, work=innovation)
    if codes is not None:
        codes.copy_(codes_of(q_new, q_ref, radius, bits))
    torch.sub(g, q_new, out=innovation)
    eps2 = torch.linalg.vector_norm(innovation).square()
    torch.sub(q_new, q_ref, out=innovation)
    return radius, eps2, torch.linalg.vector_norm(innovation).square()


def apply_codes(q_ref: torch.Tensor, codes: torch.Tensor, radius: torch.Tensor, bits: int) -> torch.Tensor:
    """``q_ref <- Q(g)`` in place from the codes and radius :func:`quantize_step` returned for
    this ``q_ref``: the same floats as its ``q_new``, as long as the radius is finite."""
    levels = (1 << bits) - 1
    unit = 2 * radius / levels
    if q_ref.dtype == torch.float32 and native.usable(q_ref, codes):
        return native.laq_apply_codes(codes, float(radius), float(unit), q_ref)
    # code * unit + q_ref - R as the quantizer rounds it (the sum's operands commute exactly)
    return q_ref.add_(codes.to(q_ref.dtype).mul_(unit)).sub_(radius)


def add_dequantized(total: torch.Tensor, packed: torch.Tensor, radius: torch.Tensor, bits: int) -> torch.Tensor:
    """``total += dequantize(0, radius, codes)`` for the ``total.numel()`` codes packed in
    ``packed``: a receiver's reconstruction of one upload, added to the sum of uploads."""
    n = total.numel()
    if total.dtype == torch.float32 and native.usable(total, packed, radius):
        unit = 2 * radius / ((1 << bits) - 1)
        return native.unpack_dequantize(packed, n, bits, float(radius), float(unit), total, accumulate=True)
    return total.add_(dequantize(torch.zeros_like(total), radius, unpack_codes(packed, n, bits), bits))


def codes_of(q: torch.Tensor, q_ref: torch.Tensor, radius: torch.Tensor, bits: int) -> torch.Tensor:
    """The uint8 codes of a quantized ``q`` (inverse of :func:`dequantize`)."""
    levels = (1 << bits) - 1
    safe = torch.where(radius > 0, radius, torch.ones_like(radius))
    return ((q - q_ref + radius) / (2 * safe / levels)).round_().clamp_(0, levels).to(torch.uint8)


def dequantize(q_ref: torch.Tensor, radius: torch.Tensor, codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``q_ref - R + 2 tau R code`` (exactly the receiver's reconstruction)."""
    levels = (1 << bits) - 1
    return q_ref - radius + (2 * radius / levels) * codes.to(q_ref.dtype)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes of ``bits`` bits each into ``ceil(len * bits / 8)`` bytes."""
    if native.usable(codes) and codes.dtype == torch.uint8:
        return native.pack_codes(codes, bits)
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    planes = ((codes.unsqueeze(1) >> shifts) & 1).reshape(-1)  # bit j of code i at i*bits + j
    return pack_bits(planes.bool())


def unpack_codes(packed: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`; ``packed`` may be ``(..., nbytes)``."""
    planes = unpack_bits(packed, count * bits).view(torch.uint8)
    planes = planes.view(*packed.shape[:-1], count, bits)
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=packed.device)).to(torch.uint8)
    return (planes * weights).sum(-1, dtype=torch.uint8)
