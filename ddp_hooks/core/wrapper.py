"""Optimizer-wrapper base for algorithms that synchronize models periodically.

The shape of torch's ``PostLocalSGDOptimizer``: :meth:`SyncOptimizer.before_step` (e.g. a rule
that needs the whole gradient), the wrapped optimizer's local step, then
:meth:`SyncOptimizer.after_step` (e.g. a periodic model synchronization). It subclasses
``torch.optim.Optimizer`` so that learning-rate schedulers accept it.
"""

from typing import Any

import torch

from .state import HookState


class SyncOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer``; the algorithm's synchronization runs after each local step."""

    def __init__(self, optimizer: torch.optim.Optimizer, hook_state: HookState) -> None:
        # torch.optim.Optimizer.__init__ is not called: parameters live in the inner optimizer.
        self.optim = optimizer
        self.hook_state = hook_state
        self.defaults = optimizer.defaults

    @property
    def param_groups(self):
        return self.optim.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.optim.param_groups = value

    @property
    def state(self):
        return self.optim.state

    def add_param_group(self, param_group: dict) -> None:
        self.optim.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optim.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        """:meth:`before_step`, the local optimizer step, then :meth:`after_step`."""
        self.before_step()
        loss = self.optim.step(closure)
        self.after_step()
        return loss

    def before_step(self) -> None:
        """The algorithm's work between backward and the local step (override)."""

    def after_step(self) -> None:
        """The algorithm's synchronization after the local step (override)."""

    def stats(self) -> dict:
        return self.hook_state.stats()

    def wrapper_state(self) -> dict[str, Any]:
        """The wrapper's own state to checkpoint (override)."""
        return {}

    def load_wrapper_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`wrapper_state` (override)."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optim.state_dict(),
            "wrapper": self.wrapper_state(),
            "hook": self.hook_state.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.hook_state.load_state_dict(state_dict["hook"])
        self.optim.load_state_dict(state_dict["optimizer"])
        self.load_wrapper_state(state_dict["wrapper"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optim!r})"


class PeriodicSyncOptimizer(SyncOptimizer):
    """Counts local steps and calls :meth:`synchronize` after every ``period`` of them
    (``period = 0``: never)."""

    def __init__(self, optimizer: torch.optim.Optimizer, hook_state: HookState, period: int) -> None:
        super().__init__(optimizer, hook_state)
        self.period = period
        self.local_steps = 0

    def after_step(self) -> None:
        self.local_steps += 1
        if self.period and self.local_steps % self.period == 0:
            self.synchronize(max(0, self.hook_state.step - 1))

    def synchronize(self, step: int) -> None:
        """The algorithm's periodic synchronization, attributed to training step ``step``."""
        raise NotImplementedError

    def wrapper_state(self) -> dict[str, Any]:
        return {"local_steps": self.local_steps}

    def load_wrapper_state(self, state: dict[str, Any]) -> None:
        self.local_steps = int(state["local_steps"])
