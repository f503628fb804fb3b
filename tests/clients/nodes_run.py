"""One rank of a two-node torchrun job (each node a network namespace): every algorithm trains
the digits MLP flat and node-aware (``node_size="auto"``, from torchrun's LOCAL_WORLD_SIZE);
reports per run the accuracy, the parameters and the library's byte counts."""

import argparse
import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_hooks import catalog

from common import accuracy, leave, local_batches, make_model, report  # noqa: I001


def train(name: str, node_size, steps: int) -> dict:
    entry = catalog.ENTRIES[name]
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = make_model()
    ddp = DDP(model)
    optimizer = entry.optimizer(ddp.parameters(), 0.05 * entry.lr_scale)
    state = entry.state(node_size=node_size).register(ddp, optimizer)
    for x, y in local_batches(rank, world, steps):
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        optimizer.step()
    with getattr(state, "averaged", contextlib.nullcontext)():
        acc = accuracy(model)
        params = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()
    stats = state.stats()
    return {
        "accuracy": acc,
        "params": params,
        "wire_bytes": stats["total"]["wire_bytes"],
        "intra_bytes": stats.get("intra_node", {}).get("total", {}).get("wire_bytes", 0),
        "node_size": stats.get("node_size"),
        "steps": state.step,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hooks", required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    runs = {}
    for name in args.hooks.split(","):
        for mode, node_size in (("flat", None), ("node", "auto")):
            runs[f"{name}/{mode}"] = train(name, node_size, args.steps)
    info = {k: int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    report(args.out, dist.get_rank(), {**info, "world": dist.get_world_size(), "runs": runs})
    leave()


if __name__ == "__main__":
    main()
