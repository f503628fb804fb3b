"""Hugging Face ``Trainer`` integration: one call registers a state on the DDP model the
Trainer builds, binds its optimizer, and keeps every rank's hook state in its checkpoints.

::

    import ddp_hooks as dh
    from ddp_hooks.transformers import attach

    args = TrainingArguments(..., optim="sgd")          # EF-SGDM and LAQ: no optimizer momentum
    trainer = Trainer(model=model, args=args, train_dataset=data)
    attach(trainer, dh.EFSignSGDM(momentum=0.9))
    trainer.train()                                      # or train(resume_from_checkpoint=True)

Trainer's callbacks see the unwrapped model, so :func:`attach` reaches for the DDP model
(``trainer.model_wrapped``) when training begins, after Accelerate prepared it. Each rank
writes its ``state.state_dict()`` into every checkpoint folder Trainer writes
(``ddp_hooks_rank<r>.pt``); ``trainer.train(resume_from_checkpoint=...)`` restores it from
the folder it resumes from, and a folder without it is an error, not a silent fresh start.
Gradient accumulation works as in plain DDP: the hook runs on the steps that synchronize.
"""

import os
from typing import Any

import torch

from .core import HookState
from .elastic import save

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError("ddp_hooks.transformers needs Hugging Face transformers: pip install transformers") from exc


def state_file(folder: str | os.PathLike[str], rank: int) -> str:
    """Where rank ``rank`` keeps its hook state in a Trainer checkpoint folder."""
    return os.path.join(folder, f"ddp_hooks_rank{rank}.pt")


class HookTrainerCallback(TrainerCallback):
    """Registers ``state`` when training begins, saves and restores it with the checkpoints
    (made by :func:`attach`, which also records the folder a run resumes from)."""

    def __init__(self, trainer: Any, state: HookState) -> None:
        self.trainer = trainer
        self.state = state
        self.resume_from: str | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.state.bound:
            self.state.register(self.trainer.model_wrapped, self.trainer.optimizer)
        if self.resume_from is not None:
            path = state_file(self.resume_from, self.state.group_rank)
            if not os.path.exists(path):
                raise ValueError(
                    f"resuming from {self.resume_from}, which holds no ddp_hooks state for rank "
                    f"{self.state.group_rank} ({os.path.basename(path)}): was it written with attach()?"
                )
            self.state.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
            self.resume_from = None

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        save(self.state.state_dict(), state_file(folder, self.state.group_rank))


def attach(trainer: Any, state: HookState) -> HookTrainerCallback:
    """Serve ``trainer``'s model with ``state`` (see the module docstring); returns the callback."""
    if not isinstance(state, HookState):
        raise ValueError(f"state must be a ddp_hooks state, got {type(state).__name__}")
    callback = HookTrainerCallback(trainer, state)
    trainer.add_callback(callback)
    train = trainer.train

    def train_and_restore(resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        folder = resume_from_checkpoint
        if isinstance(folder, bool):
            folder = get_last_checkpoint(trainer.args.output_dir) if folder else None
        callback.resume_from = None if folder is None else str(folder)
        return train(resume_from_checkpoint, *args, **kwargs)

    trainer.train = train_and_restore
    return callback
