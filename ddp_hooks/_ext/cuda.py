"""Fused CUDA kernels, built on first use with torch.utils.cpp_extension (JIT, cached in the
torch extensions directory), and proven before use.

* ``sign_compress_ef``: blockwise scaled sign + error feedback + bit packing (one pass for
  blocks of up to 4096 elements, two passes otherwise);
* ``unpack_average``: unpack, scale and average n packed sign messages into one buffer;
* ``topk_ef``: exact top-k by magnitude (radix select, no host synchronization) with error
  feedback, plain or SignTopK values;
* ``threshold_ef``: one-pass selection above a device-side threshold, fixed capacity.

The first time the extension is loaded on a device, every kernel runs once on small random
inputs (odd sizes, tails, ties) against its torch reference (:mod:`.cuda_check`); a kernel
that disagrees is switched off for the process with one log line naming it, and the compress
layer keeps using the reference for it. :func:`status` says what is active and why.
``DDP_HOOKS_NO_CUDA_EXT=1`` forces the torch path; no GPU, no CUDA compiler or a failed build
also do, with one log line. The sources are found next to the package (a checkout) or as the
``ddp_hooks/cuda_kernels`` package data (a wheel). Only :mod:`ddp_hooks.compress` calls these.
"""

import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

from .loader import Extension

log = logging.getLogger("ddp_hooks")
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


class _Kernels:
    """Which kernels passed their check, on which device type (CUDA, or a stand-in's)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.device_type = "cuda"
        self.module: Any = None  # a stand-in installed by tests; else EXTENSION's module
        self.checked = False
        self.active: dict[str, str] = {}  # kernel -> "active" or "off: why"


_K = _Kernels()


def _module() -> Any:
    return _K.module if _K.module is not None else EXTENSION.get()


def _checked() -> dict[str, str]:
    if _K.checked:
        return _K.active
    with _K.lock:
        if not _K.checked:
            module = _module()
            if module is None:
                _K.active = dict.fromkeys(KERNELS, f"off: {EXTENSION.reason}")
            else:
                from .cuda_check import check_all

                _K.active = check_all(sys_module(), _K.device_type)
                for name, verdict in _K.active.items():
                    if verdict != "active":
                        log.warning("ddp_hooks: CUDA kernel %s switched off: %s", name, verdict)
            _K.checked = True
    return _K.active


def sys_module() -> Any:
    """This module (for the check, which calls the wrappers below)."""
    import sys

    return sys.modules[__name__]


def install(module: Any, device_type: str) -> None:
    """Use ``module`` (same API as the built extension) for tensors of ``device_type``: how the
    test suite runs the dispatch path on CPU through a stand-in of torch references."""
    with _K.lock:
        _K.module, _K.device_type, _K.checked, _K.active = module, device_type, False, {}


def uninstall() -> None:
    install(None, "cuda")


def status() -> dict[str, str]:
    """Each kernel: 'active', or why it is off."""
    return dict(_checked())


def usable(kernel: str, *tensors: torch.Tensor) -> bool:
    """Whether ``kernel`` runs for these tensors (fp32/uint8 contiguous on the kernels' device,
    extension loaded, kernel checked)."""
    if not tensors or any(t.device.type != _K.device_type or not t.is_contiguous() for t in tensors):
        return False
    return _checked().get(kernel) == "active"


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
    packed, scales = _module().sign_compress_ef(*args)
    return packed, scales


def unpack_average(rows: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[i]`` = mean over the rows of ``+-scales[row, block(i)]`` by the row's sign bit
    ``i`` (rows ``(n, nbytes)`` uint8, scales ``(n, >= nblocks)``); 0 past the last block."""
    result: torch.Tensor = _module().unpack_average_out(rows, scales, offsets, out, _stream(rows))
    return result


def topk_ef(p: torch.Tensor, e: torch.Tensor, k: int, sign: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``|p + e|``: (int64 indices, fp32 message values), unordered; ``e``
    becomes the error ``v - q`` (``q``: the kept values, or SignTopK's ``+-||v_kept||_1 / k``)."""
    idx, values = _module().topk_ef(p, e, int(k), bool(sign), _stream(p))
    return idx, values


def threshold_ef(
    p: torch.Tensor, e: torch.Tensor, threshold: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass: elements with ``|p + e| >= threshold`` (a device fp32 scalar) up to
    ``capacity``: (indices, values, count); unused slots hold index 0 and value 0; ``e``
    becomes the error."""
    idx, values, count = _module().threshold_ef(p, e, threshold, int(capacity), _stream(p))
    return idx, values, count
