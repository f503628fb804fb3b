"""Following the user's own optimizer through torch's optimizer step hooks.

No algorithm replaces the optimizer: the state attaches a post-step hook to the optimizer that
owns the DDP model's parameters (``optimizer.register_step_post_hook``), as torchft's LocalSGD
does, and runs its own work there (a periodic model synchronization, the learning rate just
used). When no optimizer is given, a global post-step hook
(``torch.optim.optimizer.register_optimizer_step_post_hook``) finds it: the first optimizer
that steps any of the model's parameters is bound, validated, and followed from then on.
``GradScaler`` skips ``optimizer.step()`` for a non-finite step, and with it these hooks, on
every rank alike (the hooks make the skip decision identical on all ranks).
"""

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

Optimizer = torch.optim.Optimizer


def unwrap(optimizer: Any) -> Optimizer:
    """The torch optimizer inside wrappers such as Accelerate's ``AcceleratedOptimizer`` or
    Lightning's ``LightningOptimizer``."""
    for _ in range(4):  # wrappers may subclass Optimizer without being one inside
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, Optimizer):
            break
        optimizer = inner
    if not isinstance(optimizer, Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def owned_ids(optimizer: Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


class OptimizerLink:
    """The optimizer a state follows: found, validated, and hooked after each step.

    ``on_bind(optimizer)`` validates (raising ValueError) and ``after_step()`` is the state's
    work after each optimizer step; ``param_ids()`` are the ids of the model's trainable
    parameters (known once the state has seen the model).
    """

    def __init__(
        self,
        on_bind: Callable[[Optimizer], None],
        after_step: Callable[[], None],
        param_ids: Callable[[], set[int]],
    ) -> None:
        self.optimizer: Optimizer | None = None
        self._on_bind = on_bind
        self._after_step = after_step
        self._param_ids = param_ids
        self._handles: list[RemovableHandle] = []
        self._discovery: RemovableHandle | None = None

    def bind(self, optimizer: Any, *, run_now: bool = False) -> Optimizer:
        """Follow ``optimizer`` (validated first); ``run_now``: it has just stepped."""
        opt = unwrap(optimizer)
        if self.optimizer is opt:
            return opt
        if self.optimizer is not None:
            raise ValueError("this state already follows another optimizer; use one state per model and optimizer")
        ids = self._param_ids()
        missing = len(ids - owned_ids(opt))
        if ids and missing:
            raise ValueError(
                f"the optimizer does not step {missing} of the model's {len(ids)} trainable parameters; "
                "give the state the optimizer that owns all of them"
            )
        self._on_bind(opt)
        self.optimizer = opt
        ref = weakref.ref(self)
        self._handles.append(opt.register_step_post_hook(lambda *_: _call(ref, "_stepped")))
        if run_now:
            self._after_step()
        return opt

    def discover(self) -> None:
        """Bind the first optimizer that steps the model's parameters (global step hook)."""
        if self.optimizer is not None or self._discovery is not None:
            return
        from torch.optim.optimizer import register_optimizer_step_post_hook

        ref = weakref.ref(self)
        self._discovery = register_optimizer_step_post_hook(lambda opt, *_: _call(ref, "_found", opt))

    def _found(self, optimizer: Optimizer) -> None:
        if self.optimizer is not None:
            return
        ids = self._param_ids()
        if ids and ids & owned_ids(optimizer):
            self.bind(optimizer, run_now=True)

    def _stepped(self) -> None:
        if self._discovery is not None:
            # removed here, not while torch iterates the global hooks
            self._discovery.remove()
            self._discovery = None
        self._after_step()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        if self._discovery is not None:
            self._discovery.remove()
        self._handles, self._discovery = [], None


def _call(ref: "weakref.ref[OptimizerLink]", name: str, *args: Any) -> None:
    link = ref()
    if link is not None:
        getattr(link, name)(*args)
