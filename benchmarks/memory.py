"""Does any hook grow memory over a long run? Process memory and live tensors per hook.

Each hook trains a ~1M-parameter MLP (several buckets) for ``--steps`` steps on 2 ranks; after
``--warmup`` steps (buckets rebuilt, workspaces built) and at the end it records the resident
set size of the process and the number of live tensors (``gc`` objects that are tensors).
Growth after warm-up would be a leak: per-step allocations kept alive, futures or held
buckets never released, stats without a bound.

    python benchmarks/memory.py                      # every hook, 1000 steps
    python benchmarks/memory.py --hooks powersgd,laq --steps 300
"""

import argparse
import gc
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import launch  # noqa: E402
from benchmarks.common import comma_choices, listing, table, write_json  # noqa: E402
from ddp_hooks import catalog  # noqa: E402


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if torch.is_tensor(obj))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10))


def measure(rank: int, world: int, name: str, steps: int, warmup: int) -> dict:
    model = _model()
    ddp = DDP(model, bucket_cap_mb=1)
    setup = catalog.build(name, ddp, 0.01)
    g = torch.Generator().manual_seed(rank)
    marks = {}
    for step in range(1, steps + 1):
        x, y = torch.randn(32, 256, generator=g), torch.randint(0, 10, (32,), generator=g)
        setup.optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        setup.optimizer.step()
        if step in (warmup, steps):
            marks[step] = (_rss_mb(), _live_tensors())
    (rss0, live0), (rss1, live1) = marks[warmup], marks[steps]
    return {
        "hook": name,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "rss_warm_mb": rss0,
        "rss_end_mb": rss1,
        "rss_growth_mb": rss1 - rss0,
        "live_warm": live0,
        "live_end": live1,
        "live_growth": live1 - live0,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hooks", default=",".join(catalog.ENTRIES), help=listing(catalog.ENTRIES))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not 1 <= args.warmup < args.steps:
        ap.error("--warmup must be at least 1 and below --steps")
    rows = []
    for name in comma_choices(ap, "--hooks", args.hooks, catalog.ENTRIES):
        results = launch.run(measure, 2, name, args.steps, args.warmup)
        if results is not None:  # the rank that grew most
            rows.append(max(results, key=lambda r: (r["live_growth"], r["rss_growth_mb"])))
    if rows:
        print(
            table(
                rows,
                [
                    ("hook", "hook", ""),
                    ("params", "params", ",d"),
                    ("rss_warm_mb", "RSS warm MB", ".1f"),
                    ("rss_growth_mb", "RSS growth MB", ".2f"),
                    ("live_warm", "tensors warm", "d"),
                    ("live_growth", "tensor growth", "d"),
                ],
            )
        )
        print(write_json("memory", {"steps": args.steps, "warmup": args.warmup, "rows": rows}, args.out))
    return rows


if __name__ == "__main__":
    main()
