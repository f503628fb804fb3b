"""The base every algorithm's state builds on.

A state is what ``ddp.register_comm_hook(state, hook)`` receives. :class:`HookState` holds the
process group, counts training steps through ``bucket.is_last()``, runs the optional exact
warm-up, owns the per-parameter memory and the transport, and makes all of it checkpointable.
An algorithm subclasses it and implements :meth:`HookState.reduce`.
"""

from typing import Any

import torch
import torch.distributed as dist
from torch.futures import Future

from ..comm import Transport
from .checks import check_int
from .memory import ParameterMemory
from .stats import Stats

_FORMAT = 1


def comm_hook(state: "HookState", bucket):
    """The DDP communication hook of every state in this library.

    ``ddp.register_comm_hook(state, ddp_hooks.comm_hook)`` is what :meth:`HookState.register`
    does. (Annotations are omitted on ``bucket`` on purpose: DDP checks them by identity.)
    """
    return state.run(bucket)


class HookState:
    """Shared machinery of a compression hook.

    Args:
        process_group: the group to reduce over (default: ``torch.distributed.group.WORLD``).
        warmup_steps: number of first training steps reduced by an exact fp32 all-reduce,
            bit-identical to DDP without a hook.
    """

    #: dependent collective rounds per bucket (each later round gets its own process group)
    stages: int = 1

    def __init__(self, *, process_group=None, warmup_steps: int = 0) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                f"{type(self).__name__} needs an initialized default process group: "
                "call torch.distributed.init_process_group(...) first"
            )
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.process_group)
        self.world_size = dist.get_world_size(self.process_group)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.step = 0
        self.memory = ParameterMemory()
        self._stats = Stats(self.world_size)
        self.transport = Transport(self.process_group, self._stats, self.stages)
        self.optimizer: torch.optim.Optimizer | None = None
        self._names: dict[int, str] | None = None
        self._named: dict[str, torch.Tensor] | None = None

    # ---- wiring ----------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module) -> "HookState":
        """Learn the parameter names of ``model`` (a DDP model or its module), for checkpoints."""
        module = getattr(model, "module", model)
        named = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self._named = named
        self._names = {id(p): n for n, p in named.items()}
        return self

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Attach the optimizer whose learning rates the state reads (validated first)."""
        self.check_optimizer(optimizer)
        self.optimizer = optimizer

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise ValueError if ``optimizer`` cannot be combined with this algorithm."""

    def register(self, ddp: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        """Register this state on ``ddp`` in one line; returns the state."""
        self.attach(ddp)
        if optimizer is not None:
            self.bind_optimizer(optimizer)
        ddp.register_comm_hook(self, comm_hook)
        return self

    # ---- the hook -----------------------------------------------------------------------------
    def run(self, bucket) -> Future:
        """Hook body: count the step, warm up exactly, else hand over to :meth:`reduce`."""
        step = self.step
        if bucket.is_last():
            self.step += 1
        buffer = bucket.buffer()
        self._stats.elements(step, buffer.numel())
        if step < self.warmup_steps:
            return self.exact_mean(buffer, step)
        return self.reduce(bucket, step)

    def reduce(self, bucket, step: int) -> Future:
        """Compress, communicate and decompress one bucket; the future holds the new gradient."""
        raise NotImplementedError

    def exact_mean(self, buffer: torch.Tensor, step: int, stage: int = 0) -> Future:
        """Mean all-reduce exactly as DDP does without a hook (scale by 1/n, then sum)."""
        buffer.mul_(1.0 / self.world_size)
        self._stats.paper_bits(step, 8 * buffer.numel() * buffer.element_size())
        return self.transport.all_reduce(buffer, step, stage)

    # ---- helpers for algorithms ------------------------------------------------------------
    def learning_rates(self, params) -> list[float]:
        """The current learning rate of each parameter, read from the bound optimizer."""
        if self.optimizer is None:
            raise RuntimeError(
                f"{type(self).__name__} reads the learning rate from its optimizer: "
                "pass it to register(ddp, optimizer) or call bind_optimizer(optimizer)"
            )
        lr_of = {id(p): float(g["lr"]) for g in self.optimizer.param_groups for p in g["params"]}
        try:
            return [lr_of[id(p)] for p in params]
        except KeyError:
            raise RuntimeError(
                "a parameter of the DDP model is not in the bound optimizer's param_groups"
            ) from None

    def time(self, step: int, phase: str, device: torch.device):
        """Context manager that adds the block's time to ``compress_s`` or ``decompress_s``."""
        return self._stats.timer(step, phase, device)

    def count_bits(self, step: int, bits: float) -> None:
        """Record the payload bits the algorithm's paper counts for this step."""
        self._stats.paper_bits(step, bits)

    # ---- reporting and checkpoints -------------------------------------------------------------
    def stats(self) -> dict:
        """Bytes, paper bits, ratio to fp32 all-reduce and codec time: last step and total."""
        out = self._stats.summary(self.step)
        out["algorithm"] = type(self).__name__
        return out

    def extra_state(self) -> dict[str, Any]:
        """Algorithm-specific counters and tensors to checkpoint (override)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned (override)."""

    def _require_names(self) -> dict[int, str]:
        if self._names is None:
            raise RuntimeError(
                f"{type(self).__name__} does not know the model's parameter names: use "
                "state.register(ddp) or call state.attach(ddp) before saving or loading"
            )
        return self._names

    def layout(self) -> dict[str, tuple[int, ...]]:
        self._require_names()
        return {n: tuple(p.shape) for n, p in self._named.items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything this rank needs to resume exactly: step, memory, counters, RNG states."""
        names = self._require_names()
        return {
            "format": _FORMAT,
            "algorithm": type(self).__name__,
            "world_size": self.world_size,
            "rank": self.rank,
            "step": self.step,
            "layout": self.layout(),
            "memory": self.memory.export(names),
            "stats": self._stats.state_dict(),
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of the same algorithm, world size, rank and model."""
        self._require_names()
        problems = []
        if state.get("algorithm") != type(self).__name__:
            problems.append(f"algorithm: saved {state.get('algorithm')}, this is {type(self).__name__}")
        if state.get("world_size") != self.world_size:
            problems.append(f"world size: saved {state.get('world_size')}, now {self.world_size}")
        if state.get("rank") != self.rank:
            problems.append(f"rank: saved {state.get('rank')}, now {self.rank}")
        saved, now = state.get("layout", {}), self.layout()
        missing = sorted(set(now) - set(saved))
        unexpected = sorted(set(saved) - set(now))
        reshaped = sorted(n for n in set(now) & set(saved) if tuple(saved[n]) != now[n])
        if missing:
            problems.append(f"parameters missing from the checkpoint: {missing[:5]}")
        if unexpected:
            problems.append(f"parameters not in this model: {unexpected[:5]}")
        for n in reshaped[:5]:
            problems.append(f"shape of {n}: saved {tuple(saved[n])}, now {now[n]}")
        if problems:
            raise ValueError(
                f"cannot load {type(self).__name__} state: " + "; ".join(problems)
            )
        self.step = int(state["step"])
        self.memory.restore(state["memory"], self._named)
        self._stats.load_state_dict(state["stats"])
        self.load_extra_state(state["extra"])
