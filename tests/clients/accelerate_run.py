"""An Accelerate training script with one ddp_hooks state, run by ``accelerate launch``
(2 CPU ranks): the state is registered on the model ``accelerator.prepare`` returns."""

import argparse
import contextlib

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from ddp_hooks import catalog

from common import accuracy, leave, load_digits, make_model, report  # noqa: I001


def run(accelerator, name, steps):
    """Train with the state registered after ``prepare``; this rank's findings."""
    entry = catalog.ENTRIES[name]
    torch.manual_seed(0)
    model = make_model()
    optimizer = entry.optimizer(model.parameters(), 0.05 * entry.lr_scale)
    x, y, _, _ = load_digits(0)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = entry.state().register(model, optimizer)  # the one line, after prepare
    done, backwards = 0, 0
    while done < steps:
        for xb, yb in loader:
            with accelerator.accumulate(model):
                accelerator.backward(F.cross_entropy(model(xb), yb))
                backwards += 1
                optimizer.step()
                optimizer.zero_grad()
            done += 1
            if done >= steps:
                break
    unwrapped = accelerator.unwrap_model(model)
    with getattr(state, "averaged", contextlib.nullcontext)():
        acc = accuracy(unwrapped)
    return {
        "distributed_type": str(accelerator.distributed_type),
        "accuracy": acc,
        "hook_steps": state.step,
        "backwards": backwards,
        "ratio": state.stats()["total"]["ratio"],
        "params": [p.detach().double().sum().item() for p in unwrapped.parameters()],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hooks", required=True, help="comma-separated catalog names, run one after the other")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.accumulate)
    results = {name: run(accelerator, name, args.steps) for name in args.hooks.split(",")}
    report(args.out, accelerator.process_index, results)
    leave()


if __name__ == "__main__":
    main()
