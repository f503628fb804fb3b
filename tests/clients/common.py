"""What the client scripts share: the digits data, the model, and how they report."""

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ddp_hooks.demo import load_digits, make_model  # noqa: E402,F401


def local_batches(rank: int, world: int, steps: int, batch: int = 32, seed: int = 0):
    """This rank's share of the digits training set, as ``steps`` random batches."""
    x_train, y_train, _, _ = load_digits(seed)
    x, y = x_train[rank::world], y_train[rank::world]
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    idx = [torch.randint(0, len(x), (batch,), generator=g) for _ in range(steps)]
    return [(x[i], y[i]) for i in idx]


def accuracy(model: nn.Module) -> float:
    _, _, x_test, y_test = load_digits(0)
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


def leave() -> None:
    """Every rank meets, then the group goes: a rank that exits first can abort a peer still
    reading from it (SIGABRT). Garbage is collected before and after, so that no group is
    left referenced by a cycle: a referenced group keeps its gloo threads past
    ``destroy_process_group``, into interpreter shutdown."""
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()


def report(out_dir: str, rank: int, result: dict) -> None:
    """Write this rank's result where the test reads it."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
