"""Hugging Face ``Trainer`` with a tiny GPT-2 built from a config (no download), 2 CPU ranks
under torchrun, gradient accumulation 2, one line: ``attach(trainer, state)``.

``--steps N`` trains N optimizer steps, checkpointing every ``--save-every``; ``--resume DIR``
continues from a checkpoint folder; ``--then-resume DIR`` runs once more, in the same processes
with a fresh model, Trainer and state, resumed from DIR. Each rank reports the hook's step count, the optimizer's,
the logged losses and its final parameters.
"""

import argparse
import os

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from ddp_hooks import catalog
from ddp_hooks.transformers import attach

from common import leave  # noqa: I001


class _Tokens(torch.utils.data.Dataset):
    """Sequences of a small repeating language: each token follows from the one before."""

    def __init__(self, n: int = 256, length: int = 16, vocab: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (start + 3 * torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _OptimizerSteps(TrainerCallback):
    def __init__(self) -> None:
        self.steps = 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.steps += 1


def train(args: argparse.Namespace, resume: str | None) -> dict:
    """One Trainer run from a fresh model, state and Trainer (``resume``: a checkpoint folder)."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    model = GPT2LMHeadModel(config)
    training = TrainingArguments(
        output_dir=args.output,
        use_cpu=True,
        ddp_backend="gloo",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=args.steps,
        save_steps=args.save_every,
        logging_steps=1,
        learning_rate=0.3,
        lr_scheduler_type="constant",
        optim="sgd",
        weight_decay=0.0,
        report_to=[],
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=training, train_dataset=_Tokens())
    entry = catalog.ENTRIES[args.hook]
    state = entry.state()
    attach(trainer, state)
    steps = _OptimizerSteps()
    trainer.add_callback(steps)
    trainer.train(resume_from_checkpoint=resume)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {
        "hook_steps": state.step,
        "optimizer_steps": steps.steps,
        "global_step": trainer.state.global_step,
        "losses": losses,
        "params": [p.detach().clone() for p in model.parameters()],
        "world": dist.get_world_size(),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hook", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--save-every", type=int, default=10)
    ap.add_argument("--resume", default=None, help="a checkpoint folder to resume from")
    ap.add_argument("--then-resume", default=None, help="after the run, a second one resumed from this folder")
    ap.add_argument("--output", required=True)
    ap.add_argument("--report", required=True)
    args = ap.parse_args()
    report = {"run": train(args, args.resume)}
    if args.then_resume:
        report["resumed"] = train(args, args.then_resume)
    torch.save(report, os.path.join(args.report, f"rank{dist.get_rank()}.pt"))
    leave()


if __name__ == "__main__":
    main()
