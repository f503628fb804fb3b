"""Per-parameter memory (error, momentum, warm-start factors) that survives bucket rebuilds.

DDP rebuilds its buckets after the first iteration, so the set and order of parameters behind
``bucket.index()`` changes. Memory is therefore keyed by parameter. For speed each slot is also
kept as one flat tensor per bucket layout: :meth:`ParameterMemory.flat` returns a flat buffer
in the order of ``bucket.parameters()`` whose per-parameter pieces *are* the stored memory, so
a hook reads and writes it in place. When a new layout appears, the new flat buffer is
assembled once from the per-parameter pieces and they are re-pointed into it.
"""

import threading
from collections.abc import Callable, Sequence

import torch


class ParameterMemory:
    """Named slots of per-parameter tensors, with zero-copy flat views per bucket layout."""

    def __init__(self) -> None:
        self._pieces: dict[str, dict[int, torch.Tensor]] = {}
        self._flats: dict[tuple, torch.Tensor] = {}
        self._params: dict[int, torch.Tensor] = {}  # keeps ids stable while memory exists
        self._lock = threading.Lock()

    def flat(
        self,
        slot: str,
        params: Sequence[torch.Tensor],
        dtype: torch.dtype = torch.float32,
        sizes: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Flat memory for ``params`` in this order (zeros on first use), shared with the pieces.

        Each parameter's piece has ``p.numel()`` elements, or ``sizes[i]`` when given (for
        memory of another shape, e.g. warm-start factors).
        """
        key = (slot, dtype, tuple(id(p) for p in params))
        buf = self._flats.get(key)
        if buf is not None:
            return buf
        with self._lock:
            pieces = self._pieces.setdefault(slot, {})
            numels = [p.numel() for p in params] if sizes is None else list(sizes)
            buf = torch.zeros(sum(numels), dtype=dtype, device=params[0].device)
            for p, view in zip(params, buf.split(numels)):
                old = pieces.get(id(p))
                if old is not None:
                    view.copy_(old.reshape(-1))
                pieces[id(p)] = view
                self._params[id(p)] = p
            ids = set(key[2])
            for other in [k for k in self._flats if k[0] == slot and ids.intersection(k[2])]:
                del self._flats[other]
            self._flats[key] = buf
            return buf

    def swap_flat(self, slot: str, params: Sequence[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
        """Make ``new`` (same size) the flat memory of ``params`` in ``slot``; returns the old
        flat buffer, free for reuse. Saves a copy when a whole slot is recomputed."""
        key = (slot, new.dtype, tuple(id(p) for p in params))
        with self._lock:
            old = self._flats[key]
            pieces = self._pieces[slot]
            sizes = [pieces[id(p)].numel() for p in params]
            for p, view in zip(params, new.split(sizes)):
                pieces[id(p)] = view
            self._flats[key] = new
            return old

    def needs_assembly(self, slot: str, params: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> bool:
        """True if :meth:`flat` would build a new layout from pieces stored earlier."""
        if (slot, dtype, tuple(id(p) for p in params)) in self._flats:
            return False
        pieces = self._pieces.get(slot, {})
        return any(id(p) in pieces for p in params)

    def missing(self, slot: str, params: Sequence[torch.Tensor]) -> list[int]:
        """Positions in ``params`` of the parameters with nothing stored in ``slot`` yet."""
        pieces = self._pieces.get(slot, {})
        return [i for i, p in enumerate(params) if id(p) not in pieces]

    def get(
        self,
        slot: str,
        param: torch.Tensor,
        factory: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """The tensor stored for ``param`` in ``slot``; created by ``factory`` when missing."""
        pieces = self._pieces.setdefault(slot, {})
        value = pieces.get(id(param))
        if value is None and factory is not None:
            with self._lock:
                value = pieces[id(param)] = factory()
                self._params[id(param)] = param
        return value

    def set(self, slot: str, param: torch.Tensor, value: torch.Tensor) -> None:
        """Store ``value`` for ``param`` in ``slot`` (any shape; not part of a flat layout)."""
        with self._lock:
            self._pieces.setdefault(slot, {})[id(param)] = value
            self._params[id(param)] = param

    def clear(self, slot: str | None = None) -> None:
        """Zero one slot (or all): the memory is wiped, not forgotten."""
        with self._lock:
            for name, pieces in self._pieces.items():
                if slot is None or name == slot:
                    for t in pieces.values():
                        t.zero_()

    def slots(self) -> list[str]:
        return list(self._pieces)

    def export(self, names: dict[int, str]) -> dict[str, dict[str, torch.Tensor]]:
        """Copies of every stored tensor, keyed by slot and parameter name."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for slot, pieces in self._pieces.items():
            out[slot] = {}
            for pid, tensor in pieces.items():
                if pid not in names:
                    raise RuntimeError(
                        "memory holds a parameter that is not in the attached module; "
                        "attach the module the hook is registered on"
                    )
                out[slot][names[pid]] = tensor.detach().clone()
        return out

    def restore(
        self, saved: dict[str, dict[str, torch.Tensor]], params: dict[str, torch.Tensor]
    ) -> None:
        """Replace all memory with ``saved`` (slot -> name -> tensor) for the named ``params``."""
        with self._lock:
            self._pieces = {}
            self._flats = {}
            self._params = {}
            for slot, tensors in saved.items():
                pieces = self._pieces[slot] = {}
                for name, tensor in tensors.items():
                    param = params[name]
                    pieces[id(param)] = tensor.detach().clone().to(param.device)
                    self._params[id(param)] = param
