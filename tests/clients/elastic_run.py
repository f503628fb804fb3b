"""The README's fault-tolerant recipe under ``torchrun --max-restarts``: a process group per
attempt (``ddp_hooks.elastic``), atomic per-rank checkpoints every few steps, resume from them.

Trains one model per hook side by side, step by step; with ``--kill``, rank 1 kills itself
(SIGKILL) at step 10 of the first attempt, after the checkpoints of step 8: torchrun restarts
every worker and each hook resumes from step 8. Each rank saves its final parameters per hook,
for comparison with an uninterrupted run.
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

from common import leave, local_batches, make_model  # noqa: I001

STEPS, EVERY, KILL_AT = 14, 4, 10


class Run:
    """One hook's model, optimizer and state, resumed from its checkpoint when there is one."""

    def __init__(self, name: str, rank: int, out: Path) -> None:
        entry = catalog.ENTRIES[name]
        torch.manual_seed(0)
        self.model = make_model()
        self.ddp = DDP(self.model)
        self.optimizer = entry.optimizer(self.ddp.parameters(), 0.05 * entry.lr_scale)
        self.state = entry.state().register(self.ddp, self.optimizer)
        self.checkpoint, self.start = out / name / f"rank{rank}.pt", 0
        if self.checkpoint.exists():
            saved = torch.load(self.checkpoint, weights_only=False)
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.state.load_state_dict(saved["hook"])
            self.start = saved["step"]

    def step(self, x: torch.Tensor, y: torch.Tensor, t: int) -> None:
        self.optimizer.zero_grad()
        F.cross_entropy(self.ddp(x), y).backward()
        self.optimizer.step()
        if (t + 1) % EVERY == 0:
            saved = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
            elastic.save({**saved, "hook": self.state.state_dict(), "step": t + 1}, self.checkpoint)


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
    runs = {name: Run(name, rank, out) for name in args.hooks.split(",")}
    data = local_batches(rank, world, STEPS)
    start = {run.start for run in runs.values()}
    assert len(start) == 1, "every hook checkpoints at the same steps"
    for t in range(start.pop(), STEPS):
        for run in runs.values():
            run.step(*data[t], t)
        if args.kill and rank == 1 and attempt == 0 and t + 1 == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
    for name, run in runs.items():
        result = {"params": [p.detach().clone() for p in run.model.parameters()], "attempt": attempt}
        elastic.save({**result, "resumed_from": run.start}, out / f"{name}_rank{rank}.pt")
    leave()


if __name__ == "__main__":
    main()
