"""An Accelerate training script with one ddp_hooks state, run by ``accelerate launch``
(2 CPU ranks): the state is registered on the model ``accelerator.prepare`` returns."""

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from ddp_hooks import catalog

from common import accuracy, load_digits, make_model, report  # noqa: I001


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hook", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    entry = catalog.ENTRIES[args.hook]
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.accumulate)
    torch.manual_seed(0)
    model = make_model()
    optimizer = entry.optimizer(model.parameters(), 0.05 * entry.lr_scale)
    x, y, _, _ = load_digits(0)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = entry.state().register(model, optimizer)  # the one line, after prepare
    steps, backwards = 0, 0
    while steps < args.steps:
        for xb, yb in loader:
            with accelerator.accumulate(model):
                accelerator.backward(F.cross_entropy(model(xb), yb))
                backwards += 1
                optimizer.step()
                optimizer.zero_grad()
            steps += 1
            if steps >= args.steps:
                break
    unwrapped = accelerator.unwrap_model(model)
    with getattr(state, "averaged", __import__("contextlib").nullcontext)():
        acc = accuracy(unwrapped)
    report(
        args.out,
        accelerator.process_index,
        {
            "distributed_type": str(accelerator.distributed_type),
            "accuracy": acc,
            "hook_steps": state.step,
            "backwards": backwards,
            "ratio": state.stats()["total"]["ratio"],
            "params": [p.detach().double().sum().item() for p in unwrapped.parameters()],
        },
    )


if __name__ == "__main__":
    main()
