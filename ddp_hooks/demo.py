"""Train a small model with every hook side by side and print what each one saved.

``python -m ddp_hooks.demo`` (or ``ddp-hooks-demo``) launches N local workers (gloo on the CPU;
NCCL when N GPUs are present), trains a two-layer MLP on scikit-learn's handwritten digits
(shipped with the package, so it runs offline), once per hook, and prints a table: final test
loss and accuracy, bytes each worker sent per step, the ratio to an fp32 all-reduce, and the
median step time.
"""

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import catalog
from .testing import run_world


def _raw_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (pixels 0..16, labels), cached as a tensor file after the first
    load: every worker of every run reads them, and importing scikit-learn takes a second."""
    from ._ext.cpu import cache_dir

    path = cache_dir() / "digits.pt"
    if path.exists():
        try:
            x, y = torch.load(path, weights_only=True)
            return x, y
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
            pass
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:  # pragma: no cover - exercised only without the extra
        sys.exit("the demo needs scikit-learn: pip install 'ddp-hooks[demo]'")
    data = sk_digits()
    x, y = torch.tensor(data.data, dtype=torch.float32), torch.tensor(data.target, dtype=torch.long)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save((x, y), tmp)
    os.replace(tmp, path)  # atomic: workers may write at once
    return x, y


def load_digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardized digits: (x_train, y_train, x_test, y_test), 80/20 split."""
    x, y = _raw_digits()
    x = x / 16.0
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(x))
    mean, std = x[:cut].mean(0), x[:cut].std(0) + 1e-3
    x = (x - mean) / std
    return x[:cut], y[:cut], x[cut:], y[cut:]


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


@dataclass(frozen=True)
class RunConfig:
    """One demo run: how long, how large, how fast, which seed, and whether to print progress."""

    steps: int = 300
    batch: int = 32
    lr: float = 0.05
    seed: int = 0
    verbose: bool = True


def train(rank: int, world: int, name: str, config: RunConfig) -> tuple[float, float, dict[str, Any], list[float]]:
    """One worker of one run: returns (test loss, test accuracy, stats, step times)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    steps, batch, lr, seed, verbose = config.steps, config.batch, config.lr, config.seed, config.verbose
    x_train, y_train, x_test, y_test = load_digits(seed)
    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    x_local, y_local = x_train[rank::world].to(device), y_train[rank::world].to(device)
    torch.manual_seed(seed)
    model = make_model().to(device)
    ddp = DDP(model, device_ids=[device.index] if cuda else None)
    setup = catalog.build(name, ddp, lr)
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    times = []
    for step in range(steps):
        idx = torch.randint(0, len(x_local), (batch,), generator=g).to(device)
        t0 = time.perf_counter()
        setup.optimizer.zero_grad()
        loss = F.cross_entropy(ddp(x_local[idx]), y_local[idx])
        loss.backward()
        setup.optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if verbose and rank == 0 and (step + 1) % max(1, steps // 4) == 0:
            print(f"    {name:>10} step {step + 1:4d}/{steps}  train loss {loss.item():.3f}", flush=True)
    with setup.evaluation(), torch.no_grad():
        logits = model(x_test.to(device))
        test_loss = F.cross_entropy(logits, y_test.to(device)).item()
        accuracy = (logits.argmax(1).cpu() == y_test).float().mean().item()
    return test_loss, accuracy, setup.state.stats(), times


def run(
    hooks: list[str], workers: int, steps: int, batch: int, lr: float, seed: int, verbose: bool = True
) -> tuple[list[dict[str, Any]], str]:
    """Train once per hook; returns one result row per hook, and the backend."""
    config = RunConfig(steps, batch, lr, seed, verbose)
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= workers else "gloo"
    rows = []
    for i, name in enumerate(hooks, 1):
        if verbose:
            print(f"[{i}/{len(hooks)}] {name}: {catalog.ENTRIES[name].summary}", flush=True)
        t0 = time.perf_counter()
        results = run_world(train, workers, name, config, backend=backend, timeout=900)
        loss, acc, stats, times = results[0]
        total = stats["total"]
        rows.append(
            {
                "hook": name,
                "test_loss": loss,
                "accuracy": acc,
                "bytes_per_step": total["wire_bytes"] / max(1, total["steps"]),
                "ratio": total["ratio"],
                "step_ms": 1000 * statistics.median(times[min(5, len(times) - 1) :]),
                "seconds": time.perf_counter() - t0,
            }
        )
    return rows, backend


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'hook':>12} {'test loss':>9} {'accuracy':>8} {'bytes/worker/step':>17} {'vs fp32':>8} {'step ms':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['hook']:>12} {r['test_loss']:9.3f} {r['accuracy']:8.3f} {r['bytes_per_step']:17,.0f} "
            f"{r['ratio']:7.1f}x {r['step_ms']:8.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ddp-hooks-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="local worker processes (default 2)")
    parser.add_argument(
        "--hooks", default=",".join(catalog.ENTRIES), help=f"comma-separated, from: {', '.join(catalog.ENTRIES)}"
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps per hook (default 300)")
    parser.add_argument("--batch", type=int, default=32, help="per-worker batch size (default 32)")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    hooks = [h.strip() for h in args.hooks.split(",") if h.strip()]
    unknown = [h for h in hooks if h not in catalog.ENTRIES]
    if unknown:
        parser.error(f"unknown hooks {unknown}; choose from {', '.join(catalog.ENTRIES)}")
    if args.workers < 1 or args.steps < 1 or args.batch < 1:
        parser.error("--workers, --steps and --batch must be at least 1")
    load_digits(args.seed)  # fail early if scikit-learn is missing
    print(f"ddp-hooks demo: {args.workers} workers, digits MLP, {args.steps} steps per hook", flush=True)
    rows, backend = run(hooks, args.workers, args.steps, args.batch, args.lr, args.seed)
    print(f"\nbackend {backend}; bytes = what each worker puts on the wire per step (ring model)\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
