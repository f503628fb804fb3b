"""Where the compress layer's math runs: a fused CPU loop, a fused CUDA kernel, or the torch
reference (:mod:`.reference`). The one decision point is :func:`usable`.

* CPU loops (:mod:`ddp_hooks._ext.cpu`): for contiguous CPU tensors once the loops are built.
* CUDA kernels (:mod:`ddp_hooks._ext.cuda`): for contiguous tensors on the kernels' device once
  the extension is loaded and the kernel passed its load-time check: the first time it is
  asked for, every kernel runs once on small random inputs against its torch reference
  (:mod:`.kernel_checks`); a kernel that disagrees is switched off for the process, with one
  log line naming it, and its callers keep using the reference.

:func:`status` says what is active and why. Callers check dtypes themselves (the kernels take
fp32 values and uint8 packed bytes).
"""

import logging
import threading
from typing import Any

import torch

from .._ext import cpu, cuda
from .kernel_checks import check_all

log = logging.getLogger("ddp_hooks")


class _Checked:
    """Which CUDA kernels passed their check, on which device type (CUDA, or a stand-in's)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.device_type = "cuda"
        self.done = False
        self.verdicts: dict[str, str] = {}  # kernel -> "active" or "off: why"


_CUDA = _Checked()


def _cuda_verdicts() -> dict[str, str]:
    if _CUDA.done:
        return _CUDA.verdicts
    with _CUDA.lock:
        if not _CUDA.done:
            if cuda.module() is None:
                _CUDA.verdicts = dict.fromkeys(cuda.KERNELS, f"off: {cuda.EXTENSION.reason}")
            else:
                _CUDA.verdicts = check_all(cuda, _CUDA.device_type)
                for name, verdict in _CUDA.verdicts.items():
                    if verdict != "active":
                        log.warning("ddp_hooks: CUDA kernel %s switched off: %s", name, verdict)
            _CUDA.done = True
    return _CUDA.verdicts


def usable(kernel: str, *tensors: torch.Tensor) -> bool:
    """Whether ``kernel`` (a name of :data:`ddp_hooks._ext.cpu.KERNELS` or
    :data:`ddp_hooks._ext.cuda.KERNELS`) runs for these tensors: all contiguous on its device,
    and the compiled code loaded (and, for CUDA, checked)."""
    if kernel in cpu.KERNELS:
        return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors) and cpu.available()
    if kernel not in cuda.KERNELS:
        raise ValueError(f"kernel must be one of {cpu.KERNELS + cuda.KERNELS}, got {kernel!r}")
    if not tensors or any(t.device.type != _CUDA.device_type or not t.is_contiguous() for t in tensors):
        return False
    return _cuda_verdicts().get(kernel) == "active"


def install(module: Any, device_type: str) -> None:
    """Use ``module`` (same API as the built CUDA extension) for tensors of ``device_type``:
    how the test suite runs the CUDA dispatch path on CPU through a stand-in of the torch
    references. Its kernels are checked again at first use."""
    with _CUDA.lock:
        cuda.use(module)
        _CUDA.device_type, _CUDA.done, _CUDA.verdicts = device_type, False, {}


def uninstall() -> None:
    """Back to the built extension on CUDA tensors."""
    install(None, "cuda")


def status() -> dict[str, str]:
    """``{"cpu": ..., "<cuda kernel>": ...}``: 'loaded' / 'active', or why it is off."""
    return {"cpu": cpu.status(), **_cuda_verdicts()}
