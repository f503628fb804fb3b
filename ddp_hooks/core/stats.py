"""Byte and time accounting for one hook state.

Counts are taken when a collective is issued (payload sizes follow from shapes, so they are
known without waiting), attributed to the training step that produced the payload.

* ``sent_bytes`` / ``received_bytes``: bytes of the tensors handed to the collectives
  (inputs) and of the tensors the collectives fill (outputs).
* ``wire_bytes``: bytes each worker puts on the network under the usual cost models
  (ring all-reduce ``2(n-1)/n * S``; all-gather ``(n-1) * S``; all-to-all ``(n-1)/n * S``).
* ``fp32_wire_bytes``: the same for an fp32 ring all-reduce of the gradient elements the hook
  reduced, the baseline every ratio is taken against.
* ``paper_bits``: what the algorithm's paper counts (uplink payload bits per worker).
* ``compress_s`` / ``decompress_s``: seconds spent encoding and decoding (CUDA events on GPU,
  resolved lazily when :meth:`Stats.summary` is called, so the hook never synchronizes).
"""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

COUNTERS = (
    "sent_bytes",
    "received_bytes",
    "wire_bytes",
    "fp32_wire_bytes",
    "paper_bits",
    "elements",
    "compress_s",
    "decompress_s",
)

# wire bytes per worker as a multiple of the input payload size S, for world size n
_WIRE = {
    "all_reduce": lambda n: 2.0 * (n - 1) / n,
    "all_gather": lambda n: float(n - 1),
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0 if n > 1 else 0.0,
}


def wire_factor(kind: str, world_size: int) -> float:
    """Bytes on the wire per worker per payload byte for collective ``kind``."""
    return float(_WIRE[kind](world_size))


class Stats:
    """Per-step and cumulative counters of one state. Thread safe (callbacks count too)."""

    def __init__(self, world_size: int = 1, keep_steps: int = 4) -> None:
        self.world_size = world_size  # set when the state binds to its process group
        self._keep = keep_steps
        self._lock = threading.Lock()
        self._steps: dict[int, dict[str, float]] = {}
        self._total = dict.fromkeys(COUNTERS, 0.0)
        self._peak = 0.0  # the most bytes this rank sent in one step
        self._pending_events: list[tuple[int, str, torch.cuda.Event, torch.cuda.Event]] = []

    def _add(self, step: int, key: str, value: float) -> None:
        with self._lock:
            record = self._steps.get(step)
            if record is None:
                record = self._steps[step] = dict.fromkeys(COUNTERS, 0.0)
                for old in sorted(self._steps)[: -self._keep]:
                    del self._steps[old]
            record[key] += value
            self._total[key] += value
            if key == "sent_bytes":
                self._peak = max(self._peak, record[key])

    def collective(self, step: int, kind: str, sent: int, received: int, wire: float | None = None) -> None:
        """Record one collective of ``kind`` with input ``sent`` and output ``received`` bytes;
        ``wire``: its wire bytes when known exactly (else from the cost model of ``kind``)."""
        self._add(step, "sent_bytes", sent)
        self._add(step, "received_bytes", received)
        self._add(step, "wire_bytes", sent * wire_factor(kind, self.world_size) if wire is None else wire)

    def elements(self, step: int, numel: int) -> None:
        """Record ``numel`` gradient elements reduced (defines the fp32 all-reduce baseline)."""
        self._add(step, "elements", numel)
        self._add(step, "fp32_wire_bytes", 4 * numel * wire_factor("all_reduce", self.world_size))

    def paper_bits(self, step: int, bits: float) -> None:
        """Record the payload bits the algorithm's paper would count."""
        self._add(step, "paper_bits", bits)

    @contextmanager
    def timer(self, step: int, phase: str, device: torch.device) -> Iterator[None]:
        """Time a block as ``compress`` or ``decompress`` without synchronizing the device."""
        key = f"{phase}_s"
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            with self._lock:
                self._pending_events.append((step, key, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._add(step, key, time.perf_counter() - t0)

    def _resolve_events(self) -> None:
        with self._lock:
            pending, self._pending_events = self._pending_events, []
        for step, key, start, end in pending:
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000.0
            with self._lock:
                if step in self._steps:
                    self._steps[step][key] += seconds
                self._total[key] += seconds

    def summary(self, completed_steps: int) -> dict[str, Any]:
        """Counters of the last completed step and the totals, with ratios to fp32 all-reduce."""
        self._resolve_events()
        with self._lock:
            last = dict(self._steps.get(completed_steps - 1, dict.fromkeys(COUNTERS, 0.0)))
            total = dict(self._total)
        for record in (last, total):
            wire = record["wire_bytes"]
            record["ratio"] = record["fp32_wire_bytes"] / wire if wire > 0 else float("inf")
            bits = record["paper_bits"]
            record["paper_ratio"] = 32 * record["elements"] / bits if bits > 0 else float("inf")
        total["steps"] = completed_steps
        total["peak_sent_bytes"] = self._peak
        return {"world_size": self.world_size, "last_step": last, "total": total}

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"total": dict(self._total), "peak_sent_bytes": self._peak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self._lock:
            self._total.update({k: float(v) for k, v in state["total"].items()})
            self._peak = float(state.get("peak_sent_bytes", 0.0))

    @staticmethod
    def problems(saved: object) -> list[str]:
        """What keeps ``saved`` from being loaded by :meth:`load_state_dict`."""
        total = saved.get("total") if isinstance(saved, dict) else None
        if not isinstance(total, dict):
            return ["stats must be a dict with a 'total' dict"]
        bad = [
            k for k, v in total.items() if k not in COUNTERS or isinstance(v, bool) or not isinstance(v, (int, float))
        ]
        peak = saved.get("peak_sent_bytes", 0.0) if isinstance(saved, dict) else 0.0
        if isinstance(peak, bool) or not isinstance(peak, (int, float)):
            bad.append("peak_sent_bytes")
        return [f"stats: unknown or non-numeric counters {sorted(bad)}"] if bad else []
