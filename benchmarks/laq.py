"""LAQ's MNIST experiment on offline data: GD, QGD, LAG and LAQ side by side.

The seed's setting (10 workers, softmax regression, alpha = 0.02, b = 4, D = 10, xi = 0.8/D,
t_bar = 100, full local gradients, loss = cross-entropy + 0.01 (|W|^2 + |b|^2) / 2) on
scikit-learn's handwritten digits (8x8 images, shipped with the package) instead of MNIST, split
into contiguous shards, one per worker. In DDP's mean convention ``lr = alpha * M``.

For each method: iterations to reach the target accuracy (default: GD's final accuracy), the
uploads (communications, summed over workers) and the paper's bits up to then, the bytes that
crossed the wire, and the final accuracy and loss.

    python benchmarks/laq.py --iterations 2000
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ddp_hooks as dh  # noqa: E402
from benchmarks.common import table, write_json  # noqa: E402
from ddp_hooks.testing import run_world  # noqa: E402

METHODS = {
    "GD": {"quantize": False, "skip": False},
    "QGD": {"quantize": True, "skip": False},
    "LAG": {"quantize": False, "skip": True},
    "LAQ": {"quantize": True, "skip": True},
}


def _data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    cut = 1500
    return x[:cut], y[:cut], x[cut:], y[cut:]


def _loss(model, x, y):
    return F.cross_entropy(model(x), y) + 0.01 * 0.5 * sum(p.square().sum() for p in model.parameters())


def _run(rank, world, settings, iterations, alpha, bits, eval_every):
    x_train, y_train, x_test, y_test = _data()
    shard = len(x_train) // world
    x, y = x_train[rank * shard : (rank + 1) * shard], y_train[rank * shard : (rank + 1) * shard]
    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    ddp = DDP(model)
    state = dh.LAQ.paper(bits=bits, memory_depth=10, max_staleness=100, wire="uploads", **settings)
    opt = torch.optim.SGD(ddp.parameters(), lr=alpha * world)
    state.register(ddp, opt)
    numel = sum(p.numel() for p in model.parameters())
    points = []
    for k in range(1, iterations + 1):
        opt.zero_grad()
        _loss(ddp, x, y).backward()
        opt.step()
        if k % eval_every == 0 or k == iterations:
            stats = state.stats()
            with torch.no_grad():
                acc = (model(x_test).argmax(1) == y_test).float().mean().item()
                train_loss = _loss(model, x_train, y_train).item()
            points.append(
                {
                    "iteration": k,
                    "accuracy": acc,
                    "train_loss": train_loss,
                    "uploads": stats["uploads_all_ranks"],
                    "paper_bits": stats["uploads_all_ranks"] * state.upload_bits(numel),
                    "wire_bytes": stats["total"]["wire_bytes"],
                }
            )
    return points


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--alpha", type=float, default=0.02)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--target", type=float, default=None, help="accuracy target (default: GD's final)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    runs = {}
    for name, settings in METHODS.items():
        print(f"{name} ...", flush=True)
        results = run_world(
            _run, args.workers, settings, args.iterations, args.alpha, args.bits, args.eval_every, timeout=3600
        )
        runs[name] = results[0]
    target = args.target if args.target is not None else runs["GD"][-1]["accuracy"]
    rows = []
    for name, points in runs.items():
        hit = next((p for p in points if p["accuracy"] >= target), None)
        last = points[-1]
        rows.append(
            {
                "method": name,
                "iterations": hit["iteration"] if hit else None,
                "uploads": hit["uploads"] if hit else None,
                "bits": hit["paper_bits"] if hit else None,
                "final_accuracy": last["accuracy"],
                "final_loss": last["train_loss"],
                "total_uploads": last["uploads"],
                "total_bits": last["paper_bits"],
                "wire_bytes_per_worker": last["wire_bytes"],
            }
        )
    print(
        f"\n{args.workers} workers, softmax regression on digits, alpha {args.alpha}, b {args.bits}, "
        f"{args.iterations} iterations; to target accuracy {target:.4f}\n"
    )
    print(
        table(
            rows,
            [
                ("method", "method", ""),
                ("iterations", "iterations", ""),
                ("uploads", "communications", ""),
                ("bits", "bits", ".3g"),
                ("final_accuracy", "final acc", ".4f"),
                ("final_loss", "final loss", ".4f"),
                ("total_uploads", "all uploads", ""),
                ("total_bits", "all bits", ".3g"),
            ],
        )
    )
    path = write_json(
        "laq_digits",
        {
            "workers": args.workers,
            "iterations": args.iterations,
            "alpha": args.alpha,
            "bits": args.bits,
            "target_accuracy": target,
            "table": rows,
            "curves": runs,
        },
        args.out,
    )
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
