"""One rank of a two-node torchrun job (each node a network namespace): every algorithm trains
the digits MLP flat and node-aware (``node_size="auto"``, from torchrun's LOCAL_WORLD_SIZE),
and, with ``--fsdp``, as an HSDP model (``fully_shard`` inside each node, ``register_fsdp``
between the nodes); reports per run the accuracy, the parameters and the library's byte counts."""

import argparse
import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_hooks import catalog

from common import accuracy, leave, local_batches, make_model, report  # noqa: I001


def _sharded(entry, mesh):
    """The model sharded inside the node (each layer, then the root); its optimizer and state."""
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    optimizer = entry.optimizer(model.parameters(), 0.05 * entry.lr_scale)
    return model, model, optimizer, entry.state().register_fsdp(model, optimizer, mesh=mesh)


def train(name: str, mode: str, steps: int, mesh=None) -> dict:
    entry = catalog.ENTRIES[name]
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    if mode == "fsdp":
        model, wrapped, optimizer, state = _sharded(entry, mesh)
    else:
        model = make_model()
        wrapped = DDP(model)
        optimizer = entry.optimizer(wrapped.parameters(), 0.05 * entry.lr_scale)
        state = entry.state(node_size="auto" if mode == "node" else None).register(wrapped, optimizer)
    for x, y in local_batches(rank, world, steps):
        optimizer.zero_grad()
        F.cross_entropy(wrapped(x), y).backward()
        optimizer.step()
    with getattr(state, "averaged", contextlib.nullcontext)():
        acc = accuracy(model)
        whole = [p.full_tensor() if mode == "fsdp" else p for p in model.parameters()]
        params = torch.cat([p.detach().reshape(-1) for p in whole]).tolist()
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
    ap.add_argument("--fsdp", action="store_true", help="also as an HSDP model (torch 2.7 and later)")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    mesh = None
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        per_node = int(os.environ["LOCAL_WORLD_SIZE"])
        shape = (dist.get_world_size() // per_node, per_node)
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
    runs = {}
    for name in args.hooks.split(","):
        for mode in ("flat", "node") + (("fsdp",) if args.fsdp else ()):
            runs[f"{name}/{mode}"] = train(name, mode, args.steps, mesh)
    info = {k: int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    report(args.out, dist.get_rank(), {**info, "world": dist.get_world_size(), "runs": runs})
    leave()


if __name__ == "__main__":
    main()
