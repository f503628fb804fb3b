"""Checkpoints of a state: everything a rank needs to resume, loaded all-or-nothing.

:func:`problems` validates every part of a saved dict (its keys, the algorithm and its
configuration, world size, rank, parameter layout, each memory tensor's dtype, size and
finiteness, the counters, and the algorithm's own extra state) before :func:`load_state_dict` assigns
anything, so a checkpoint that does not fit leaves the state exactly as it was.

Every part follows one protocol, ``state_dict`` / ``problems`` / ``load_state_dict``: the
state (:class:`~ddp_hooks.core.HookState`), its per-parameter memory
(:class:`~ddp_hooks.core.ParameterMemory`), its counters (:class:`~ddp_hooks.core.Stats`), its
generators (:class:`~ddp_hooks.core.Generators`); an algorithm's own part is
``extra_state_dict`` / ``extra_problems`` / ``load_extra_state_dict``, and the parts it is
made of name theirs alike (``local_state_dict``, ``flights_problems``, ...). No part reads
another's private attributes.
"""

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from .memory import ParameterMemory
from .model import ModelView
from .stats import Stats


class Checkpointed(Protocol):
    """What a state offers its checkpoint (:class:`~ddp_hooks.core.HookState` does); its byte
    counters are handed over by the state itself."""

    step: int
    memory: ParameterMemory

    def config(self) -> dict[str, Any]: ...
    def model_view(self) -> ModelView: ...
    def extra_state_dict(self) -> dict[str, Any]: ...
    def extra_problems(self, extra: Any) -> list[str]: ...
    def load_extra_state_dict(self, state: dict[str, Any]) -> None: ...
    def memory_numel(self, slot: str, param: torch.Tensor) -> int | None: ...

    @property
    def group_size(self) -> int: ...
    @property
    def group_rank(self) -> int: ...


FORMAT = 3
#: formats this version reads: 2 lacks the memory manifest (its entries cannot be counted)
READS = (2, 3)
KEYS = ("format", "algorithm", "config", "world_size", "rank", "step", "layout", "memory", "stats", "extra")


def state_dict(state: Checkpointed, stats: Stats) -> dict[str, Any]:
    model = state.model_view()
    memory = state.memory.state_dict(model.names)
    return {
        "format": FORMAT,
        "algorithm": type(state).__name__,
        "config": state.config(),
        "world_size": state.group_size,
        "rank": state.group_rank,
        "step": state.step,
        "layout": model.layout(),
        "memory": memory,
        # what ``memory`` holds, so that an entry lost on the way is named, not left at zero
        "manifest": {slot: sorted(tensors) for slot, tensors in memory.items()},
        "stats": stats.state_dict(),
        "extra": state.extra_state_dict(),
    }


def problems(state: Checkpointed, saved: Any) -> list[str]:
    """Everything that keeps ``saved`` from being loaded into ``state`` (empty: it fits)."""
    if not isinstance(saved, Mapping):
        return [f"a checkpoint must be a dict, got {type(saved).__name__}"]
    if saved.get("format") not in READS:
        return [f"format {saved.get('format')!r}; this version reads formats {list(READS)}"]
    missing = [k for k in KEYS + (("manifest",) if saved["format"] >= 3 else ()) if k not in saved]
    if missing:
        return [f"missing parts: {missing}"]
    name = type(state).__name__
    if saved["algorithm"] != name:
        return [f"algorithm: saved {saved['algorithm']}, this is {name}"]
    out = _config_problems(saved["config"], state.config())
    for key, now in (("world_size", state.group_size), ("rank", state.group_rank)):
        if saved[key] != now:
            out.append(f"{key.replace('_', ' ')}: saved {saved[key]}, now {now}")
    step = saved["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        out.append(f"step must be a non-negative int, got {step!r}")
    model = state.model_view()
    out += _layout_problems(saved["layout"], model.layout())
    if not out:  # sizes are only meaningful for the same configuration and layout
        out += ParameterMemory.problems(saved["memory"], model.named, state.memory_numel)
        if "manifest" in saved:
            out += _manifest_problems(saved["manifest"], saved["memory"])
    out += Stats.problems(saved["stats"])
    extra = saved["extra"]
    if not isinstance(extra, Mapping):
        return out + ["extra must be a dict"]
    expected = set(state.extra_state_dict())
    if set(extra) != expected:
        unknown, lost = sorted(set(extra) - expected, key=str), sorted(expected - set(extra))
        return out + [f"extra: unexpected keys {unknown}, missing keys {lost} (expected {sorted(expected)})"]
    return out + state.extra_problems(extra)


def load_state_dict(state: Checkpointed, saved: Mapping[str, Any], stats: Stats) -> None:
    """Assign a checkpoint that :func:`problems` accepted."""
    state.step = int(saved["step"])
    state.memory.load_state_dict(saved["memory"], state.model_view().named)
    stats.load_state_dict(saved["stats"])
    state.load_extra_state_dict(saved["extra"])


def _config_problems(saved: Any, now: dict[str, Any]) -> list[str]:
    if not isinstance(saved, Mapping):
        return [f"config must be a dict, got {type(saved).__name__}"]
    keys = list(now) + [k for k in saved if k not in now]
    return [
        f"{k}: saved {saved.get(k, '<missing>')!r}, this state has {now.get(k, '<missing>')!r}"
        for k in keys
        if saved.get(k, "<missing>") != now.get(k, "<missing>")
    ]


def _manifest_problems(manifest: Any, memory: Any) -> list[str]:
    """Entries the manifest lists that ``memory`` lacks, and entries it does not list."""
    if not isinstance(manifest, Mapping) or not isinstance(memory, Mapping):
        return ["manifest must be a dict of slots"]
    out = []
    for slot in sorted(set(manifest) | set(memory), key=str):
        listed, held = set(manifest.get(slot, ())), set(memory.get(slot, {}))
        if listed - held:
            out.append(f"memory[{slot!r}]: missing entries {sorted(listed - held)[:5]}")
        if held - listed:
            out.append(f"memory[{slot!r}]: entries the manifest does not list {sorted(held - listed, key=str)[:5]}")
    return out


def _layout_problems(saved: Any, now: dict[str, tuple[int, ...]]) -> list[str]:
    if not isinstance(saved, Mapping):
        return [f"layout must be a dict, got {type(saved).__name__}"]
    out = []
    missing = sorted(set(now) - set(saved))
    unexpected = sorted(set(saved) - set(now))
    if missing:
        out.append(f"parameters missing from the checkpoint: {missing[:5]}")
    if unexpected:
        out.append(f"parameters not in this model: {unexpected[:5]}")
    for n in sorted(set(now) & set(saved)):
        if tuple(saved[n]) != now[n]:
            out.append(f"shape of {n}: saved {tuple(saved[n])}, now {now[n]}")
    return out[:8]
