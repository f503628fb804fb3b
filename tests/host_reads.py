"""Find the library's host reads of tensor values, on the CPU.

On a GPU, ``t.item()``, ``bool(t)``, ``float(t)``, ``t.tolist()``, ``torch.equal``, a boolean
mask index, ``nonzero`` or a blocking host-to-device copy wait for the device: a host
synchronization inside a hook stalls the backward pass. :func:`recording` patches these
entry points (process-wide, every thread) and records each call whose nearest caller outside
torch is a file of the ``ddp_hooks`` package, so CPU tests can prove that the branches
written for GPUs make none. It cannot see reads made inside torch's C++ operators;
``torch.cuda.set_sync_debug_mode("error")`` on a GPU does.
"""

import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

import ddp_hooks

PACKAGE = str(Path(ddp_hooks.__file__).resolve().parent)
TORCH = str(Path(torch.__file__).resolve().parent)
HERE = str(Path(__file__).resolve())
# (owner, name): the Python entry points that read a tensor's value on the host
METHODS = ["item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero", "equal", "allclose"]
FUNCTIONS = ["nonzero", "equal", "allclose", "masked_select", "unique", "argwhere"]


def _caller_in_package() -> str | None:
    """'file:line function' of the nearest caller outside torch and this file, if it is ours."""
    for frame in reversed(traceback.extract_stack()):
        path = str(Path(frame.filename).resolve())
        if path.startswith(TORCH) or path == HERE:
            continue
        if path.startswith(PACKAGE):
            return f"{Path(path).relative_to(Path(PACKAGE).parent)}:{frame.lineno} {frame.name}"
        return None
    return None


def _wrap(original, name: str, found: list[str], lock: threading.Lock, when=None):
    def wrapper(*args, **kwargs):
        if when is None or when(*args, **kwargs):
            where = _caller_in_package()
            if where is not None:
                with lock:
                    found.append(f"{name} at {where}")
        return original(*args, **kwargs)

    return wrapper


def _bool_index(tensor, index, *rest) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _blocking_copy(*args, **kwargs) -> bool:
    """A ``.to()`` that names a device (or another tensor), without ``non_blocking=True``: on
    a GPU, from host memory, it waits for the device. (A ``.to()`` of a tensor already on the
    device costs nothing there, but the library writes none.)"""
    named = any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:]) or "device" in kwargs
    return named and not (kwargs.get("non_blocking") or (len(args) > 2 and args[2] is True))


def _from_host(*args, **kwargs) -> bool:
    """``torch.tensor(data, device=...)``: a blocking host-to-device copy on a GPU."""
    return kwargs.get("device") is not None


def _no_output_size(*args, **kwargs) -> bool:
    """``repeat_interleave`` with tensor repeats and no ``output_size`` reads the total."""
    return "output_size" not in kwargs and len(args) > 1 and isinstance(args[1], torch.Tensor)


@contextmanager
def recording() -> Iterator[list[str]]:
    """Inside, every host read made by ddp_hooks code is appended to the yielded list."""
    found: list[str] = []
    lock = threading.Lock()
    saved = []
    patches = [(torch.Tensor, m, f"Tensor.{m}", None) for m in METHODS]
    patches += [(torch, f, f"torch.{f}", None) for f in FUNCTIONS]
    masks = ("__getitem__", "__setitem__")
    patches += [(torch.Tensor, m, f"Tensor.{m} with a boolean mask", _bool_index) for m in masks]
    patches += [(torch.Tensor, "to", "a blocking Tensor.to(device)", _blocking_copy)]
    patches += [(torch, f, f"torch.{f}(..., device=)", _from_host) for f in ("tensor", "as_tensor")]
    patches += [(torch, "repeat_interleave", "torch.repeat_interleave without output_size", _no_output_size)]
    for owner, attr, label, when in patches:
        own = owner.__dict__.get(attr)  # None: inherited from TensorBase
        saved.append((owner, attr, own))
        setattr(owner, attr, _wrap(getattr(owner, attr), label, found, lock, when))
    try:
        yield found
    finally:
        for owner, attr, own in reversed(saved):
            if own is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, own)
