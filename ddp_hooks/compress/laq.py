"""LAQ's innovation quantizer, b-bit code packing, and the upload message.

With reference ``q_ref`` (the last uploaded quantized gradient) and ``tau = 1 / (2^b - 1)``::

    R    = ||g - q_ref||_inf
    code = floor((g - q_ref + R) / (2 tau R) + 1/2)      in {0, ..., 2^b - 1}
    Q(g) = q_ref - R + 2 tau R code                      so |g_i - Q(g)_i| <= tau R

``R = 0`` (nothing changed) gives ``Q(g) = q_ref`` and codes of 0, with no division by zero.
Codes are packed ``b`` bits each, least significant bit first. Norms are returned in float64,
so that a very large gradient cannot overflow the skip rule's arithmetic. On CPU the fused
loops of :mod:`ddp_hooks._ext.cpu` do the work in two passes (the same ``Q(g)``).
"""

from dataclasses import dataclass
from functools import cached_property

import torch

from .._ext import cpu
from . import dispatch
from .bits import ByteLayout, pack_codes, unpack_codes


@dataclass
class Quantized:
    """One round of the quantizer: the radius and the squared norms the skip rule needs."""

    radius: torch.Tensor  # 0-d fp32
    error2: torch.Tensor  # ||g - Q(g)||^2, 0-d fp64
    innovation2: torch.Tensor  # ||Q(g) - q_ref||^2, 0-d fp64


def _grid(radius: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``2 tau R`` with R = 1 when R = 0, the grid spacing ``2 R / levels``) as 0-d tensors."""
    levels = (1 << bits) - 1
    safe = torch.where(radius > 0, radius, torch.ones_like(radius))
    return 2 * safe / levels, 2 * radius / levels


def quantize_step(
    g: torch.Tensor,
    q_ref: torch.Tensor,
    bits: int,
    *,
    q_new: torch.Tensor | None = None,
    innovation: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
    radius: torch.Tensor | None = None,
) -> Quantized:
    """Quantize ``g`` against ``q_ref``: writes ``q_new = Q(g)``, ``innovation = q_new - q_ref``
    and the uint8 ``codes``, each only if given. With only the codes, :func:`apply_codes`
    gives ``Q(g)`` later, for the rounds that need it. ``radius``: the grid's radius when ``g``
    is part of a longer vector (:func:`grid_radius` of the whole); default ``g``'s own."""
    levels = (1 << bits) - 1
    if g.dtype == torch.float32 and dispatch.usable(
        "laq_quantize", g, q_ref, *(t for t in (q_new, innovation, codes) if t is not None)
    ):
        if radius is None:
            radius = torch.tensor(cpu.absmax_diff(g, q_ref) if g.numel() else 0.0)
        step, unit = _grid(radius, bits)
        eps2, inno2 = cpu.laq_quantize(
            g, q_ref, (radius.item(), step.item(), unit.item(), levels), q_new, innovation, codes
        )
        return Quantized(radius, torch.tensor(eps2, dtype=torch.float64), torch.tensor(inno2, dtype=torch.float64))
    diff = g - q_ref
    if radius is None:
        radius = torch.linalg.vector_norm(diff, float("inf")) if diff.numel() else diff.new_zeros(())
    step, unit = _grid(radius, bits)
    grid = torch.add(diff, radius).div_(step).add_(0.5).floor_().clamp_(0, levels).mul_(radius > 0)
    if codes is not None:
        codes.copy_(grid)
    q = grid.mul_(unit).add_(q_ref).sub_(radius)  # q_ref - R + 2 tau R code
    if q_new is not None:
        q_new.copy_(q)
    eps2 = torch.linalg.vector_norm(g - q, dtype=torch.float64).square()
    torch.sub(q, q_ref, out=diff)
    if innovation is not None:
        innovation.copy_(diff)
    return Quantized(radius, eps2, torch.linalg.vector_norm(diff, dtype=torch.float64).square())


def grid_radius(g: torch.Tensor, q_ref: torch.Tensor) -> torch.Tensor:
    """``||g - q_ref||_inf`` (0-d fp32): the radius of the grid :func:`quantize_step` uses."""
    if not g.numel():
        return torch.zeros((), dtype=torch.float32, device=g.device)
    if g.dtype == torch.float32 and dispatch.usable("absmax_diff", g, q_ref):
        return torch.tensor(cpu.absmax_diff(g, q_ref))
    radius: torch.Tensor = torch.linalg.vector_norm(g - q_ref, float("inf")).float()
    return radius


def apply_codes(q_ref: torch.Tensor, codes: torch.Tensor, radius: torch.Tensor, bits: int) -> torch.Tensor:
    """``q_ref <- Q(g)`` in place from the codes and radius :func:`quantize_step` gave for this
    ``q_ref``: the same floats as its ``q_new``, as long as the radius is finite."""
    _, unit = _grid(radius, bits)
    if q_ref.dtype == torch.float32 and dispatch.usable("laq_apply_codes", q_ref, codes):
        return cpu.laq_apply_codes(codes, float(radius), float(unit), q_ref)
    # code * unit + q_ref - R as the quantizer rounds it (the sum's operands commute exactly)
    return q_ref.add_(codes.to(q_ref.dtype).mul_(unit)).sub_(radius)


def add_dequantized(total: torch.Tensor, packed: torch.Tensor, radius: torch.Tensor, bits: int) -> torch.Tensor:
    """``total += -R + 2 tau R code`` for the ``total.numel()`` codes packed in ``packed``: a
    receiver's reconstruction of one upload (its innovation), added to the sum of uploads."""
    n = total.numel()
    _, unit = _grid(radius, bits)
    if total.dtype == torch.float32 and dispatch.usable("unpack_dequantize", total, packed, radius):
        return cpu.unpack_dequantize(packed, n, bits, (float(radius), float(unit)), total, accumulate=True)
    codes = unpack_codes(packed, n, bits).to(total.dtype)
    return total.add_(torch.zeros_like(total).sub_(radius).add_(codes.mul_(unit)))


def model_change(params: list[torch.Tensor], previous: torch.Tensor) -> torch.Tensor:
    """``||theta - previous||^2`` (0-d float64) for the flat ``previous`` copy of ``params``,
    then ``previous = theta``: one pass per parameter."""
    pieces = previous.split([p.numel() for p in params])
    if all(p.dtype == torch.float32 for p in params) and dispatch.usable("sqdiff_copy", previous, *params):
        total = sum(cpu.sqdiff_copy(p.detach().reshape(-1), piece) for p, piece in zip(params, pieces))
        return torch.tensor(float(total), dtype=torch.float64)
    change = torch.zeros((), dtype=torch.float64, device=previous.device)
    for p, piece in zip(params, pieces):
        new = p.detach().reshape(-1).float()
        change += torch.linalg.vector_norm(piece - new, dtype=torch.float64).square()
        piece.copy_(new)
    return change


@dataclass(frozen=True)
class UploadMessage:
    """One upload of ``count`` b-bit codes: ``[radius (fp32) | packed codes]`` as uint8 bytes
    (a :class:`~.bits.ByteLayout`)."""

    count: int
    bits: int

    @cached_property
    def layout(self) -> ByteLayout:
        return ByteLayout({"radius": 4, "codes": -(-self.count * self.bits // 8)})

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def pack(self, radius: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return self.layout.join({"radius": radius.float().reshape(1), "codes": pack_codes(codes, self.bits)})

    def add_to(self, total: torch.Tensor, message: torch.Tensor) -> torch.Tensor:
        """``total +=`` the innovation this message carries."""
        radius = self.layout.field(message, "radius", torch.float32).view(())
        return add_dequantized(total, self.layout.field(message, "codes"), radius, self.bits)
