"""Fused CUDA kernels, built on first use with torch.utils.cpp_extension (JIT, cached in the
torch extensions directory), and proven before use.

* ``sign_compress_ef``: blockwise scaled sign + error feedback + bit packing (one pass for
  blocks of up to 4096 elements, two passes otherwise);
* ``unpack_average``: unpack, scale and average n packed sign messages into one buffer;
* ``topk_ef``: exact top-k by magnitude (radix select, no host synchronization) with error
  feedback, plain or SignTopK values;
* ``threshold_ef``: one-pass selection above a device-side threshold, fixed capacity.

This module builds, loads and calls them; :mod:`ddp_hooks.compress.dispatch` decides where
they run (each kernel is checked against its torch reference before first use).
``DDP_HOOKS_NO_CUDA_EXT=1`` forces the torch path; no GPU, no CUDA compiler or a failed build
also do, with one log line. The sources are found next to the package (a checkout) or as the
``ddp_hooks/cuda_kernels`` package data (a wheel). Only :mod:`ddp_hooks.compress` calls these.
"""

import os
from pathlib import Path
from typing import Any

import torch

from .loader import Extension

SOURCES = ("bindings.cpp", "sign.cu", "topk.cu")
KERNELS = ("sign_compress_ef", "unpack_average", "topk_ef", "threshold_ef")
ONE_PASS_MAX_BLOCK = 4096  # cuda_kernels/launchers.h: kOnePassMaxBlock


def source_dir() -> Path:
    """Where the .cu/.cpp sources are: the checkout's top-level ``cuda_kernels/``, or the copy
    installed as ``ddp_hooks/cuda_kernels`` (package data of a wheel)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here.parent / "cuda_kernels", here / "cuda_kernels"):
        if (candidate / SOURCES[0]).exists():
            return candidate
    raise FileNotFoundError("the CUDA sources are not installed (ddp_hooks/cuda_kernels)")


def _why_not() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "no CUDA compiler (CUDA_HOME not found)"
    return None


def _build() -> Any:
    from torch.utils import cpp_extension

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    src = source_dir()
    return cpp_extension.load(
        name="ddp_hooks_kernels",
        sources=[str(src / s) for s in SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=[
            "-O3",
            f"-gencode=arch=compute_{arch},code=sm_{arch}",
            f"-gencode=arch=compute_{arch},code=compute_{arch}",
        ],
        verbose=os.environ.get("DDP_HOOKS_VERBOSE_BUILD") == "1",
    )


EXTENSION = Extension("fused CUDA kernels", "DDP_HOOKS_NO_CUDA_EXT", _build, _why_not)


_STAND_IN: list[Any] = [None]  # a module with the extension's API, used in its place (tests)


def use(module: Any) -> None:
    """Call ``module`` (same API as the built extension) in place of the extension, or the
    extension again with None: how the test suite runs the dispatch path without a GPU."""
    _STAND_IN[0] = module


def module() -> Any:
    """The stand-in in use, else the built extension (None where it is off)."""
    return _STAND_IN[0] if _STAND_IN[0] is not None else EXTENSION.get()


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def sign_compress_ef(
    p: torch.Tensor, e: torch.Tensor, rho: float, offsets: torch.Tensor, e_out: torch.Tensor, max_block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``v = p + rho * e`` per block ``[offsets[b], offsets[b+1])`` (covering ``[0, n]``):
    (packed signs ``ceil(n/8)`` uint8, fp32 scales ``||v_b||_1 / d_b``); writes
    ``e_out = v - C(v)``. Blocks of at most :data:`ONE_PASS_MAX_BLOCK` elements take the one-pass
    kernel (one CTA per block), longer ones the two-pass kernel."""
    one_pass = 0 < max_block <= ONE_PASS_MAX_BLOCK
    args = (p, e, float(rho), offsets, e_out, _stream(p), one_pass)  # the binding's positional API
    packed, scales = module().sign_compress_ef(*args)
    return packed, scales


def unpack_average(rows: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[i]`` = mean over the rows of ``+-scales[row, block(i)]`` by the row's sign bit
    ``i`` (rows ``(n, nbytes)`` uint8, scales ``(n, >= nblocks)``); 0 past the last block."""
    result: torch.Tensor = module().unpack_average_out(rows, scales, offsets, out, _stream(rows))
    return result


def topk_ef(p: torch.Tensor, e: torch.Tensor, k: int, sign: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``|p + e|``: (int64 indices, fp32 message values), unordered; ``e``
    becomes the error ``v - q`` (``q``: the kept values, or SignTopK's ``+-||v_kept||_1 / k``)."""
    idx, values = module().topk_ef(p, e, int(k), bool(sign), _stream(p))
    return idx, values


def threshold_ef(
    p: torch.Tensor, e: torch.Tensor, threshold: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass: elements with ``|p + e| >= threshold`` (a device fp32 scalar) up to
    ``capacity``: (indices, values, count); unused slots hold index 0 and value 0; ``e``
    becomes the error."""
    idx, values, count = module().threshold_ef(p, e, threshold, int(capacity), _stream(p))
    return idx, values, count
