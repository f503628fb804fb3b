"""Per-parameter memory (error, momentum, warm-start factors) that survives bucket rebuilds.

DDP rebuilds its buckets after the first iteration, so the set and order of parameters behind
``bucket.index()`` changes. Memory is therefore keyed by parameter: every slot holds one flat
fp32 piece per parameter. For speed each slot is also kept as one flat tensor per bucket
layout: :meth:`ParameterMemory.flat` returns a buffer in the order of the given parameters
whose pieces *are* the stored memory, so a hook reads and writes it in place. When a new
layout appears, its buffer is assembled once from the pieces and they are re-pointed into it.
:meth:`ParameterMemory.commit` is the one place where a step's candidate memory replaces the
old one, or is dropped when the step was not finite.
"""

import threading
from collections.abc import Callable, Mapping, Sequence

import torch

from .flags import may_read_host

Params = Sequence[torch.Tensor]


def _key(slot: str, params: Params) -> tuple[str, tuple[int, ...]]:
    return slot, tuple(id(p) for p in params)


class ParameterMemory:
    """Named slots of flat per-parameter fp32 tensors, with zero-copy flat views per layout."""

    def __init__(self) -> None:
        self._pieces: dict[str, dict[int, torch.Tensor]] = {}
        self._flats: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self._lock = threading.Lock()

    def flat(self, slot: str, params: Params, sizes: Sequence[int] | None = None) -> torch.Tensor:
        """Flat memory for ``params`` in this order (zeros on first use), shared with the pieces.

        Each parameter's piece has ``p.numel()`` elements, or ``sizes[i]`` when given (memory
        of another shape, e.g. warm-start factors).
        """
        key = _key(slot, params)
        buf = self._flats.get(key)
        if buf is not None:
            return buf
        with self._lock:
            pieces = self._pieces.setdefault(slot, {})
            numels = [p.numel() for p in params] if sizes is None else list(sizes)
            buf = torch.zeros(sum(numels), dtype=torch.float32, device=params[0].device)
            for p, view in zip(params, buf.split(numels)):
                old = pieces.get(id(p))
                if old is not None:
                    view.copy_(old)
                pieces[id(p)] = view
            ids = set(key[1])
            for other in [k for k in self._flats if k[0] == slot and ids.intersection(k[1])]:
                del self._flats[other]
            self._flats[key] = buf
            return buf

    def commit(self, slot: str, params: Params, candidate: torch.Tensor, *, unless: torch.Tensor) -> torch.Tensor:
        """Make ``candidate`` (laid out as ``flat(slot, params)``) the memory unless ``unless``
        (0-d bool tensor: the step was not finite), like :func:`~.flags.keep_unless` for a whole
        slot. Returns a buffer of the same size that the caller may reuse as its next
        candidate: on a CPU the buffers are swapped (no copy), elsewhere the old memory is
        overwritten with ``torch.where`` (no host sync)."""
        current = self._flats[_key(slot, params)]  # the caller read it with flat() this step
        if may_read_host(candidate.device):
            return candidate if bool(unless) else self._swap(slot, params, candidate)
        torch.where(unless, current, candidate, out=current)
        return candidate

    def _swap(self, slot: str, params: Params, new: torch.Tensor) -> torch.Tensor:
        key = _key(slot, params)
        with self._lock:
            old = self._flats[key]
            pieces = self._pieces[slot]
            sizes = [pieces[id(p)].numel() for p in params]
            for p, view in zip(params, new.split(sizes)):
                pieces[id(p)] = view
            self._flats[key] = new
            return old

    def missing(self, slot: str, params: Params) -> list[int]:
        """Positions in ``params`` of the parameters with nothing stored in ``slot`` yet."""
        pieces = self._pieces.get(slot, {})
        return [i for i, p in enumerate(params) if id(p) not in pieces]

    def get(self, slot: str, param: torch.Tensor) -> torch.Tensor | None:
        """The flat tensor stored for ``param`` in ``slot``, or None."""
        return self._pieces.get(slot, {}).get(id(param))

    def set(self, slot: str, param: torch.Tensor, value: torch.Tensor) -> None:
        """Store a copy of ``value`` (flattened, fp32) for ``param`` in ``slot``."""
        with self._lock:
            self._pieces.setdefault(slot, {})[id(param)] = value.detach().reshape(-1).float().clone()
            for key in [k for k in self._flats if k[0] == slot and id(param) in k[1]]:
                del self._flats[key]

    def clear(self, slot: str | None = None) -> None:
        """Zero one slot (or all): the memory is wiped, not forgotten."""
        with self._lock:
            for name, pieces in self._pieces.items():
                if slot is None or name == slot:
                    for t in pieces.values():
                        t.zero_()

    def state_dict(self, names: Mapping[int, str]) -> dict[str, dict[str, torch.Tensor]]:
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

    @staticmethod
    def problems(
        saved: object, params: Mapping[str, torch.Tensor], numel: Callable[[str, torch.Tensor], int | None]
    ) -> list[str]:
        """What is wrong with ``saved`` (slot -> name -> tensor) for the named ``params``;
        ``numel(slot, param)`` is a slot's piece size, None for a slot the algorithm lacks."""
        if not isinstance(saved, Mapping):
            return [f"memory must be a dict of slots, got {type(saved).__name__}"]
        out = []
        for slot, tensors in saved.items():
            if not isinstance(tensors, Mapping):
                out.append(f"memory slot {slot!r} must be a dict, got {type(tensors).__name__}")
                continue
            for name, tensor in tensors.items():
                where = f"memory[{slot!r}][{name!r}]"
                param = params.get(name)
                expected = None if param is None else numel(slot, param)
                if param is None:
                    out.append(f"{where}: no such parameter")
                elif expected is None:
                    out.append(f"{where}: this algorithm keeps no slot {slot!r}")
                elif not torch.is_tensor(tensor) or tensor.dtype != torch.float32:
                    out.append(f"{where}: must be a float32 tensor, got {getattr(tensor, 'dtype', type(tensor))}")
                elif tensor.numel() != expected:
                    out.append(f"{where}: {tensor.numel()} elements, expected {expected}")
                elif not bool(torch.isfinite(tensor).all()):
                    out.append(f"{where}: holds inf or NaN")
        return out

    def load_state_dict(
        self, saved: Mapping[str, Mapping[str, torch.Tensor]], params: Mapping[str, torch.Tensor]
    ) -> None:
        """Replace all memory with ``saved`` (validated by :meth:`problems` first)."""
        with self._lock:
            self._pieces = {}
            self._flats = {}
            for slot, tensors in saved.items():
                pieces = self._pieces[slot] = {}
                for name, tensor in tensors.items():
                    param = params[name]
                    pieces[id(param)] = tensor.detach().reshape(-1).clone().to(param.device)
