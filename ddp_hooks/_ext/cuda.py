"""Fused CUDA kernels, built on first use with torch.utils.cpp_extension (JIT, cached in the
torch extensions directory).

* :func:`sign_compress_ef`: blockwise scaled sign + error feedback + bit packing (one pass
  for blocks of up to 4096 elements, two passes otherwise).
* :func:`unpack_average`: unpack, scale and average n packed sign messages into one buffer.
* :func:`topk_ef`: exact top-k by magnitude (radix select, no host synchronization) with
  error feedback, plain or SignTopK values.
* :func:`threshold_ef`: one-pass selection above a device-side threshold, fixed capacity.

Each has a torch reference in :mod:`ddp_hooks.compress`. ``DDP_HOOKS_NO_CUDA_EXT=1`` forces the
torch path; CPU tensors, no GPU, no CUDA compiler or a failed build also give ``None`` from
:func:`load`, with one log line saying why. The sources are found next to the package (a
checkout) or as the ``ddp_hooks/cuda_kernels`` package data (a wheel). Code is built for the GPU's
own architecture (sm_90 on an H100) plus PTX.
"""

import os
from pathlib import Path
from typing import Any

import torch

from .loader import Extension

SOURCES = ("bindings.cpp", "sign.cu", "topk.cu")


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
load = EXTENSION.get
status = EXTENSION.status


def _module_for(t: torch.Tensor):
    if not t.is_cuda:
        raise ValueError("the fused kernels take CUDA tensors; CPU tensors use ddp_hooks.compress")
    module = load()
    if module is None:
        raise RuntimeError(f"the fused CUDA kernels are not available ({EXTENSION.reason})")
    return module


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


ONE_PASS_MAX_BLOCK = 4096  # cuda_kernels/launchers.h: kOnePassMaxBlock


def sign_compress_ef(
    p: torch.Tensor,
    e: torch.Tensor,
    rho: float,
    offsets: torch.Tensor,
    e_out: torch.Tensor,
    max_block: int | None = None,
):
    """``v = p + rho * e`` per block ``[offsets[b], offsets[b+1])``: returns (packed signs
    ``ceil(n/8)`` uint8, fp32 scales ``||v_b||_1 / d_b``) and writes ``e_out = v - C(v)``.
    ``max_block``: the longest block's length, when the caller knows it; blocks of at most
    :data:`ONE_PASS_MAX_BLOCK` elements take the one-pass kernel (one CTA per block), others
    the two-pass one."""
    one_pass = max_block is not None and 0 < max_block <= ONE_PASS_MAX_BLOCK
    return tuple(_module_for(p).sign_compress_ef(p, e, float(rho), offsets, e_out, _stream(p), one_pass))


def unpack_average(rows: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[i]`` = mean over the rows of ``+-scales[row, block(i)]`` by the row's sign bit ``i``
    (rows ``(n, nbytes)`` uint8, scales ``(n, >= nblocks)``); 0 past the last block."""
    return _module_for(rows).unpack_average_out(rows, scales, offsets, out, _stream(rows))


def topk_ef(p: torch.Tensor, e: torch.Tensor, k: int, sign: bool = False):
    """Exact top-k of ``|p + e|``: (int64 indices, fp32 message values), unordered; ``e``
    becomes the error ``v - q`` (``q``: the kept values, or SignTopK's ``+-||v_kept||_1 / k``)."""
    return tuple(_module_for(p).topk_ef(p, e, int(k), bool(sign), _stream(p)))


def threshold_ef(p: torch.Tensor, e: torch.Tensor, threshold: torch.Tensor, capacity: int):
    """One pass: elements with ``|p + e| >= threshold`` (a CUDA fp32 scalar) up to ``capacity``:
    (indices, values, count); unused slots hold index 0 and value 0; ``e`` becomes the error."""
    return tuple(_module_for(p).threshold_ef(p, e, threshold, int(capacity), _stream(p)))
