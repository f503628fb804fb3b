"""Every hook's code paths on a GPU, with host synchronizations made errors.

On one GPU (a one-rank NCCL world), each state of ``catalog.PATHS`` trains a small network
with batch norm for a few steps, then runs more steps under
``torch.cuda.set_sync_debug_mode("error")``: learning rates that differ per parameter group
and change every step, the local-step algorithms' synchronizations, and a step with an inf.
Any synchronizing CUDA call inside a hook (a ``.item()``, a ``bool()`` of a device flag, a
blocking host-to-device copy, ``nonzero``) raises there; the table says which path made one
and where. LAQ with ``wire="uploads"`` reads its upload flags on the host by design.

    python benchmarks/sync_check.py [--out DIR]

The same training loop (:func:`train`) runs in the test suite on the CPU, watched by a
recorder of host reads instead (``tests/test_sync_free.py``).
"""

import argparse
import sys
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import comma_choices, listing, table, write_json  # noqa: E402
from ddp_hooks import catalog  # noqa: E402
from ddp_hooks.testing import run_world  # noqa: E402

WARMUP, WATCHED = 3, 5
Watch = Callable[[], AbstractContextManager[list[str]]]


def train(
    name: str, rank: int, world: int, device: torch.device, watch: Watch, options: dict | None = None
) -> tuple[list[str], int]:
    """``catalog.PATHS[name]`` on a DDP model on ``device``: WARMUP steps (binding and the
    configuration agreement read the host by design), then WATCHED steps, each inside
    ``watch()``, whose list collects what it saw; the last has an inf on the last rank.
    Returns what was seen (stopping at the first watched step that saw anything) and the
    state's step count. ``options`` go to the state (e.g. ``node_size``)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(24, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 6)
    ).to(device)
    ddp = DDP(model, bucket_cap_mb=0.01)  # several buckets
    entry = catalog.PATHS[name]
    head, tail = list(model[:3].parameters()), list(model[3:].parameters())
    single = name.startswith("laq")  # LAQ takes one learning rate
    groups = [{"params": head + tail}] if single else [{"params": head}, {"params": tail}]
    opt = entry.optimizer(groups, 0.05)  # type: ignore[arg-type]
    decays = [lambda t: 1.0, lambda t: 0.9**t][: len(groups)]  # differ per group: per-element rates
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, decays)
    state = entry.state(**(options or {})).register(ddp, opt)
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(16, 24, generator=g), torch.randint(0, 6, (16,), generator=g)) for _ in range(8)]
    for step in range(WARMUP + WATCHED):
        x, y = (t.to(device) for t in batches[step % len(batches)])
        if step == WARMUP + WATCHED - 1 and rank == world - 1:
            x[0, 0] = float("inf")
        watched = step >= WARMUP
        with watch() if watched else _nothing() as seen:
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
        schedule.step()
        if watched and seen:
            return sorted(set(seen)), state.step
    return [], state.step


@contextmanager
def _nothing():
    yield []


@contextmanager
def cuda_syncs():
    """Synchronizing CUDA calls raise inside; the first one is recorded (with where it was)."""
    seen: list[str] = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield seen
    except RuntimeError as exc:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "ddp_hooks" in f.filename]
        where = f" at {frames[-1].filename.split('ddp_hooks')[-1]}:{frames[-1].lineno}" if frames else ""
        seen.append(str(exc).strip().splitlines()[0][:200] + where)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _gpu_world(rank: int, world: int, names: list[str]) -> list[dict]:
    device = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for name in names:
        try:
            seen, steps = train(name, rank, world, device, cuda_syncs)
            ok = (not seen) != (name in catalog.HOST_READS_BY_DESIGN)
            rows.append({"path": name, "syncs": "; ".join(seen) or "none", "steps": steps, "as_expected": ok})
        except Exception as exc:  # noqa: BLE001 - one path's failure must not stop the others
            rows.append({"path": name, "syncs": f"error: {exc!r}"[:300], "steps": None, "as_expected": False})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", default=",".join(catalog.PATHS), help=listing(catalog.PATHS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    paths = comma_choices(parser, "--paths", args.paths, catalog.PATHS)
    if not torch.cuda.is_available():
        print("benchmarks/sync_check.py needs a CUDA GPU; nothing checked")
        return []
    rows = run_world(_gpu_world, 1, paths, backend="nccl", timeout=600)[0]
    print(table(rows, [("path", "path", ""), ("as_expected", "as expected", ""), ("syncs", "host syncs", "")]))
    from ddp_hooks import kernels

    path = write_json("sync_check", {"rows": rows, "kernels": kernels.status()}, args.out)
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
