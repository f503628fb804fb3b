"""What the algorithms with local steps share: counting the optimizer's steps, synchronizing
every ``period`` of them, and checking their part of a checkpoint."""

from collections.abc import Callable
from typing import Any


class LocalSteps:
    """Mixin for a :class:`~ddp_hooks.core.HookState`: after every ``period`` steps of the
    optimizer it follows, :meth:`synchronize` (``period = 0``: never). ``GradScaler`` skips a
    non-finite step on every rank alike, and with it this count."""

    step: int
    local_steps: int = 0

    publish: Callable[[int], None]  # HookState's

    @property
    def sync_every(self) -> int:
        """Optimizer steps between synchronizations (0: never)."""
        raise NotImplementedError

    @property
    def keeps_local_models(self) -> bool:
        """Between synchronizations every worker trains its own model."""
        return self.sync_every != 1

    def after_step(self) -> None:
        self.local_steps += 1
        step = max(0, self.step - 1)
        if self.sync_every and self.synchronize_at(self.local_steps, step):
            self.publish(step)  # every rank serving this worker takes the owners' values

    def synchronize_at(self, t: int, step: int) -> bool:
        """After the ``t``-th optimizer step (training step ``step``): synchronize if due.
        Returns whether this worker's parameters changed (default: every ``sync_every`` steps,
        :meth:`synchronize`)."""
        if t % self.sync_every:
            return False
        self.synchronize(step)
        return True

    def synchronize(self, step: int) -> None:
        """The algorithm's periodic synchronization, attributed to training step ``step``."""
        raise NotImplementedError

    def local_state_dict(self) -> dict[str, Any]:
        return {"local_steps": self.local_steps}

    @staticmethod
    def local_problems(extra: Any) -> list[str]:
        value = extra.get("local_steps")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return [f"extra['local_steps'] must be a non-negative int, got {value!r}"]
        return []

    def load_local_state_dict(self, extra: Any) -> None:
        self.local_steps = int(extra["local_steps"])
