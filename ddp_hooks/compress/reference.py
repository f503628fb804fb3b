"""The torch references of the compiled code: plain tensor operations, no dispatch.

The fused CPU loops and CUDA kernels compute these same functions faster; each kernel is
checked against them before first use (:mod:`.kernel_checks`), and the compress modules fall
back to them wherever no kernel runs. This module imports nothing of the library.

Conventions: bit ``i % 8`` of byte ``i // 8`` holds flag ``i``, padding bits are 1, signs are
``x >= 0`` (so ``sgn(0) = +1``); block sums are accumulated in float64 and rounded once to
float32.
"""

import torch

Blocks = list[tuple[int, int]]

# Multiplying 8 bytes that are 0 or 1 (one int64 word, byte i = bit i) by this constant
# gathers byte i's low bit into bit 56 + i, with no carries between them.
_GATHER = 0x0102040810204080
# Spreading a byte into 8 bytes (x * 0x0101010101010101), then keeping bit i in byte i.
_SPREAD = 0x0101010101010101
_SELECT = 0x8040201008040201 - (1 << 64)  # as a signed int64


def packed_size(n: int) -> int:
    """Bytes that hold ``n`` packed flags."""
    return -(-n // 8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool tensor into ``ceil(len/8)`` bytes."""
    n = bits.numel()
    padded = torch.ones(packed_size(n) * 8, dtype=torch.bool, device=bits.device)
    padded[:n] = bits
    return gather_bytes(padded)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack ``x >= 0`` of a 1-D tensor into ``ceil(len/8)`` bytes."""
    n = x.numel()
    bits = torch.ones(packed_size(n) * 8, dtype=torch.bool, device=x.device)
    torch.ge(x, 0, out=bits[:n])
    return gather_bytes(bits)


def gather_bytes(bits: torch.Tensor) -> torch.Tensor:
    """Bools (a multiple of 8) -> bytes, bit ``i % 8`` of byte ``i // 8`` from bool ``i``."""
    return ((bits.view(torch.uint8).view(torch.int64) * _GATHER) >> 56).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` bits of ``packed`` (``(..., nbytes)``) as bools ``(..., n)``."""
    words = (packed.to(torch.int64) * _SPREAD) & _SELECT
    return words.view(torch.uint8).view(*packed.shape[:-1], -1)[..., :n] != 0


def bounds(blocks: Blocks) -> list[int]:
    """Contiguous blocks ``[(lo, hi), ...]`` as their ``len + 1`` bounds (``[0, 0]`` for none)."""
    return [blocks[0][0]] + [hi for _, hi in blocks] if blocks else [0, 0]


def block_scales(x: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    """``||x_b||_1 / d_b`` per block (float32, accumulated in float64)."""
    magnitude = x.abs()
    sums = torch.stack([magnitude[lo:hi].sum(dtype=torch.float64) for lo, hi in blocks])
    sizes = torch.tensor([hi - lo for lo, hi in blocks], dtype=torch.float64).to(x.device, non_blocking=True)
    return (sums / sizes).to(torch.float32)


def expand(bits: torch.Tensor, scales: torch.Tensor, blocks: Blocks, out: torch.Tensor) -> torch.Tensor:
    """``out[i] = +scale or -scale`` of ``i``'s block, by the sign bit ``bits[i]``."""
    n = blocks[-1][1]
    counts = torch.tensor([hi - lo for lo, hi in blocks]).to(out.device, non_blocking=True)
    per = torch.repeat_interleave(scales[: len(blocks)], counts, output_size=n)
    torch.where(bits[:n], per, -per, out=out[:n])
    return out


def decode(packed: torch.Tensor, scales: torch.Tensor, blocks: Blocks, out: torch.Tensor) -> torch.Tensor:
    """The blockwise scaled sign ``C(x)`` from its packed signs and block scales, into ``out``."""
    return expand(unpack_bits(packed, blocks[-1][1]), scales, blocks, out)
