"""A Lightning training script with one ddp_hooks state, run by torchrun (2 CPU ranks).

Trains the digits MLP with ``Trainer(strategy=DDPStrategy(), callbacks=[HookCallback(state)])``,
saves a Lightning checkpoint, resumes from it in a second Trainer, and reports per rank:
accuracy, the state's counters, and whether the resumed state equals the saved one.
"""

import argparse
import os

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from ddp_hooks import catalog
from ddp_hooks.lightning import HookCallback

from common import accuracy, load_digits, make_model, report  # noqa: I001


class Digits(L.LightningModule):
    def __init__(self, entry, lr):
        super().__init__()
        torch.manual_seed(0)
        self.model = make_model()
        self.entry, self.lr = entry, lr

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return self.entry.optimizer(self.parameters(), self.lr * self.entry.lr_scale)


class Probe(Callback):
    """After HookCallback: the state as it starts (restored or fresh)."""

    def __init__(self, hook):
        self.hook, self.at_start = hook, None

    def on_fit_start(self, trainer, pl_module):
        self.at_start = self.hook.state.state_dict()


def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a.cpu(), b.cpu())
    return a == b


def fit(entry, lr, steps, ckpt=None):
    x, y, _, _ = load_digits(0)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    hook = HookCallback(entry.state())
    probe = Probe(hook)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(),
        max_steps=steps,
        callbacks=[hook, probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = Digits(entry, lr)
    trainer.fit(module, loader, ckpt_path=ckpt)
    return trainer, module, hook, probe


def run(name, steps, out):
    """Fit, checkpoint, resume from the checkpoint in a new Trainer; this rank's findings."""
    entry = catalog.ENTRIES[name]
    trainer, module, hook, _ = fit(entry, 0.05, steps)
    ckpt = os.path.join(out, f"{name}.ckpt")
    trainer.save_checkpoint(ckpt)
    saved = hook.state.state_dict()
    stats = hook.state.stats()["total"]
    _, module2, hook2, probe2 = fit(entry, 0.05, 2 * steps, ckpt=ckpt)
    return {
        "accuracy": accuracy(module.model),
        "accuracy_resumed": accuracy(module2.model),
        "steps": stats["steps"],
        "ratio": stats["ratio"],
        "restored_equal": same(probe2.at_start, saved),
        "steps_after_resume": hook2.state.step,
        "params": [p.detach().double().sum().item() for p in module2.model.parameters()],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hooks", required=True, help="comma-separated catalog names, run one after the other")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    results = {name: run(name, args.steps, args.out) for name in args.hooks.split(",")}
    report(args.out, int(os.environ["RANK"]), results)


if __name__ == "__main__":
    main()
