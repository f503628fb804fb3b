"""The README's plain-DDP recipe as a torchrun script (CPU ranks, gloo): one line registers
the state; reports accuracy and the bytes saved per rank."""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_hooks import catalog

from common import accuracy, leave, local_batches, make_model, report  # noqa: I001


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hook", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    entry = catalog.ENTRIES[args.hook]
    state = entry.state()  # built before the process group exists: it binds at register()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = make_model()
    ddp = DDP(model)
    optimizer = entry.optimizer(ddp.parameters(), 0.05 * entry.lr_scale)
    state.register(ddp, optimizer)
    for x, y in local_batches(rank, world, args.steps):
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        optimizer.step()
    with getattr(state, "averaged", __import__("contextlib").nullcontext)():
        acc = accuracy(model)
    report(
        args.out,
        rank,
        {
            "accuracy": acc,
            "ratio": state.stats()["total"]["ratio"],
            "steps": state.step,
            "local_rank": int(os.environ["LOCAL_RANK"]),
            "world": world,
        },
    )
    leave()


if __name__ == "__main__":
    main()
