"""Lightning integration: one callback registers a state on the strategy's DDP model.

::

    import lightning as L
    import ddp_hooks as dh
    from ddp_hooks.lightning import HookCallback

    trainer = L.Trainer(strategy="ddp", callbacks=[HookCallback(dh.PowerSGD(rank=4))])

:class:`HookCallback` registers the state on the DDP model Lightning built, on any device
(Lightning's own ``ddp_comm_hook`` argument is applied on CUDA only), binds the optimizer
Lightning set up, and puts every rank's ``state.state_dict()`` into Lightning's checkpoints
(restored into the same rank on resume). The state can be built anywhere, before the workers
exist: it binds to the process group when the callback registers it.
"""

from typing import Any

import torch

from .core import HookState

try:  # the unified package first, then the standalone one
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[assignment]
    except ImportError as exc:
        raise ImportError("ddp_hooks.lightning needs Lightning: pip install lightning") from exc

#: where the states of every rank live in a Lightning checkpoint
CHECKPOINT_KEY = "ddp_hooks"


def _to_cpu(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


class HookCallback(Callback):
    """Register ``state`` on the DDP model of a Lightning ``DDPStrategy`` and checkpoint it.

    Args:
        state: any state of this library (``dh.EFSignSGDM(...)``, ``dh.PowerSGD(...)``, ...).
    """

    def __init__(self, state: HookState) -> None:
        if not isinstance(state, HookState):
            raise ValueError(f"state must be a ddp_hooks state, got {type(state).__name__}")
        self.state = state
        self._pending: dict[str, Any] | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        model = trainer.strategy.model
        if not hasattr(model, "register_comm_hook"):
            raise ValueError(
                f"HookCallback needs a DDP strategy (DistributedDataParallel); got {type(trainer.strategy).__name__}"
            )
        optimizers = list(trainer.optimizers)
        self.state.register(model, optimizers[0] if len(optimizers) == 1 else None)
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Every rank's state, gathered (Lightning writes the checkpoint from rank 0 only)."""
        mine = _to_cpu(self.state.state_dict())
        states: list[Any] = [None] * self.state.world_size
        torch.distributed.all_gather_object(states, mine, group=self.state.process_group)
        checkpoint[CHECKPOINT_KEY] = {"world_size": self.state.world_size, "states": states}

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            return
        if not self.state.bound:  # not registered yet: Lightning restores callbacks first
            self._pending = saved
        else:
            self._restore(saved)

    def _restore(self, saved: dict[str, Any]) -> None:
        if saved.get("world_size") != self.state.world_size:
            raise ValueError(
                f"the checkpoint holds hook states of {saved.get('world_size')} ranks; this run has "
                f"{self.state.world_size}"
            )
        self.state.load_state_dict(saved["states"][self.state.rank])
