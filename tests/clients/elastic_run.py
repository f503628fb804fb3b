"""The README's fault-tolerant recipe under ``torchrun --max-restarts``: a process group per
attempt (``ddp_hooks.elastic``), atomic per-rank checkpoints every few steps, resume from them.

Trains each hook in turn; with ``--kill``, rank 1 kills itself (SIGKILL) in hook ``i`` during
restart attempt ``i``, after the checkpoint of step 8, at step 10: torchrun restarts every
worker, the hooks already done are skipped and hook ``i`` resumes from step 8. Each rank saves
its final parameters per hook, for comparison with an uninterrupted run.
"""

import argparse
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_hooks import catalog, elastic

from common import local_batches, make_model  # noqa: I001

STEPS, EVERY, KILL_AT = 14, 4, 10


def train(name: str, rank: int, world: int, out: Path, attempt: int, kill: bool, index: int) -> None:
    entry = catalog.ENTRIES[name]
    torch.manual_seed(0)
    model = make_model()
    ddp = DDP(model)
    optimizer = entry.optimizer(ddp.parameters(), 0.05 * entry.lr_scale)
    state = entry.state().register(ddp, optimizer)
    checkpoint, start = out / name / f"rank{rank}.pt", 0
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state.load_state_dict(saved["hook"])
        start = saved["step"]
    data = local_batches(rank, world, STEPS)
    for t in range(start, STEPS):
        x, y = data[t]
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        if (t + 1) % EVERY == 0:
            hook = state.state_dict()
            elastic.save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "hook": hook, "step": t + 1},
                checkpoint,
            )
        if kill and rank == 1 and attempt == index and t + 1 == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
    result = {"params": [p.detach().clone() for p in model.parameters()], "attempt": attempt, "resumed_from": start}
    elastic.save(result, out / f"{name}_rank{rank}.pt")
    dist.barrier()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hooks", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--kill", action="store_true")
    args = ap.parse_args()
    elastic.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    out = Path(args.out)
    for index, name in enumerate(args.hooks.split(",")):
        if not (out / f"{name}_rank{rank}.pt").exists():
            train(name, rank, world, out, attempt, args.kill, index)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
