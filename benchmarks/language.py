"""Validation loss of a small language model against training steps and bytes sent, for the
local-step family, with nothing to download.

The corpus is the Python standard library's own source files (they ship with every Python),
read as bytes: the files are sorted by path and every tenth goes to validation, the rest to
training, so no file is in both. The model is the GPT of ``benchmarks/models.py`` at a small
size (byte vocabulary). Every configuration trains the same initialization on ``--workers``
local ranks, each drawing its own windows of the training text, with AdamW as the (inner)
optimizer; the validation loss is measured on the mean of the ranks' models (the local-step
algorithms keep them apart; the evaluation is not counted as traffic).

Recorded per point: step, validation loss, bytes sent per worker (what left the rank: the
payloads of every collective), wire bytes per worker, and the most bytes one step sent.

    python benchmarks/language.py                      # every configuration, 4 workers
    python benchmarks/language.py --only "DDP fp32,DiLoCo H=50" --steps 2000
    python benchmarks/language.py --only "DDP fp32,SparseLoCo H=25,SparseLoCo H=60 k=10%" --name language_sweep
"""

import argparse
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ddp_hooks as dh  # noqa: E402
from benchmarks import launch  # noqa: E402
from benchmarks.common import RESULTS, comma_choices, table, write_json  # noqa: E402
from benchmarks.models import GPT  # noqa: E402

# the configurations: (label, state factory arguments); every one runs AdamW inside
CONFIGS: dict[str, tuple[str, dict]] = {
    "DDP fp32": ("fp32", {}),
    "DiLoCo H=20": ("diloco", {"period": 20}),
    "DiLoCo H=50": ("diloco", {"period": 50}),
    "DiLoCo H=50 int8": ("diloco", {"period": 50, "compressor": "int8"}),
    "Streaming DiLoCo H=50 F=4": ("diloco", {"period": 50, "fragments": 4, "delay": 1}),
    "SparseLoCo H=25": ("sparseloco", {"period": 25}),
    "Qsparse H=8 sync": ("qsparse", {"period": 8}),
    "Qsparse H=8 staggered": ("qsparse", {"period": 8, "schedule": "staggered"}),
}
# more configurations, run only when named in --only: DiLoCo's outer learning rate, SparseLoCo's
# period, density, code bits and error decay, one at a time
SWEEP: dict[str, tuple[str, dict]] = {
    "DiLoCo H=50 outer lr 0.4": ("diloco", {"period": 50, "outer_lr": 0.4}),
    "SparseLoCo H=8": ("sparseloco", {"period": 8}),
    "SparseLoCo H=15": ("sparseloco", {"period": 15}),
    "SparseLoCo H=25 8-bit": ("sparseloco", {"period": 25, "bits": 8}),
    "SparseLoCo H=25 no decay": ("sparseloco", {"period": 25, "error_decay": 1.0}),
    "SparseLoCo H=30 k=5%": ("sparseloco", {"period": 30, "k": 0.05}),
    "SparseLoCo H=60 k=10%": ("sparseloco", {"period": 60, "k": 0.1}),
}


def corpus(limit: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(training bytes, validation bytes, files) of the standard library's ``.py`` files, split
    by file (every tenth in sorted order to validation), at most ``limit`` bytes in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    train, val, used, total = [], [], 0, 0
    for i, path in enumerate(files):
        data = path.read_bytes()
        (val if i % 10 == 0 else train).append(data)
        total += len(data)
        used += 1
        if total >= limit:
            break
    as_tensor = lambda chunks: torch.frombuffer(bytearray(b"\n".join(chunks)), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(val), used


def build_state(kind: str, args: dict):
    if kind == "fp32":
        return dh.AllReduce()
    if kind == "diloco":
        return dh.DiLoCo(**args)
    if kind == "sparseloco":
        return dh.SparseLoCo(**args)
    return dh.QsparseLocalSGD("signtopk", k=0.01, **args)


def windows(text: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.stack([text[s : s + context + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def _validation_loss(model, x, y, batch=32) -> float:
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    total = 0.0
    with torch.no_grad():
        for p in params:  # the mean of the workers' models
            dist.all_reduce(p)
            p.div_(dist.get_world_size())
        for i in range(0, len(x), batch):
            logits = model(x[i : i + batch])
            total += F.cross_entropy(logits.flatten(0, 1), y[i : i + batch].flatten(), reduction="sum").item()
        for p, s in zip(params, saved):
            p.copy_(s)
    return total / y.numel()


def _run(rank, world, config, opts):
    kind, args = config
    train, val, _ = corpus(opts["corpus"])
    ctx = opts["context"]
    g_val = torch.Generator().manual_seed(1234)
    val_x, val_y = windows(val, torch.randint(0, len(val) - ctx - 1, (opts["val_windows"],), generator=g_val), ctx)
    torch.manual_seed(opts["seed"])
    model = GPT(layers=opts["layers"], width=opts["width"], heads=4, vocab=256, context=ctx)
    ddp = DDP(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=opts["lr"], weight_decay=0.1)
    state = build_state(kind, args).register(ddp, optimizer)
    g = torch.Generator().manual_seed(opts["seed"] * 1000 + rank)
    points, elapsed = [], 0.0
    for step in range(1, opts["steps"] + 1):
        x, y = windows(train, torch.randint(0, len(train) - ctx - 1, (opts["batch"],), generator=g), ctx)
        t0 = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(ddp(x).flatten(0, 1), y.flatten()).backward()
        optimizer.step()
        elapsed += time.perf_counter() - t0
        if step % opts["eval_every"] == 0 or step == opts["steps"]:
            total = state.stats()["total"]
            point = {"step": step, "seconds": elapsed, "val_loss": _validation_loss(model, val_x, val_y)}
            point.update({k: total[k] for k in ("sent_bytes", "wire_bytes", "peak_sent_bytes")})
            points.append(point)
    return points


def plot(runs: list[dict], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        steps = [p["step"] for p in r["points"]]
        loss = [p["val_loss"] for p in r["points"]]
        a.plot(steps, loss, label=r["label"])
        b.plot([max(p["sent_bytes"], 1) for p in r["points"]], loss, label=r["label"])
    a.set_xlabel("training step")
    b.set_xlabel("bytes sent per worker")
    b.set_xscale("log")
    for ax in (a, b):
        ax.set_ylabel("validation loss (nats per byte)")
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", default=None, help="comma-separated configurations (default: all but the SparseLoCo sweep)"
    )
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16, help="windows per worker per step")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--corpus", type=int, default=8_000_000, help="bytes of source read")
    parser.add_argument("--val-windows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    parser.add_argument("--name", default="language_stdlib", help="results file name, without .json / .png")
    args = parser.parse_args(argv)
    configs = {**CONFIGS, **SWEEP}
    labels = list(CONFIGS)
    if args.only:
        labels = comma_choices(parser, "--only", args.only, configs)
    opts = {k: getattr(args, k) for k in ("steps", "eval_every", "batch", "context", "layers", "width", "lr")}
    opts.update(corpus=args.corpus, val_windows=args.val_windows, seed=args.seed)
    train, val, files = corpus(args.corpus)
    print(f"corpus: {files} files of the standard library, {len(train):,} training and {len(val):,} validation bytes")
    runs = []
    for i, label in enumerate(labels, 1):
        print(f"[{i}/{len(labels)}] {label} ...", flush=True)
        results = launch.run(_run, args.workers, configs[label], opts)
        if results is None:
            continue
        last = results[0][-1]
        runs.append(
            {
                "label": label,
                "config": configs[label],
                "points": results[0],
                "val_loss": last["val_loss"],
                "sent_bytes": last["sent_bytes"],
                "wire_bytes": last["wire_bytes"],
                "peak_sent_bytes": max(r[-1]["peak_sent_bytes"] for r in results),
            }
        )
    if not runs:
        return []
    summarize(runs)
    out_dir = Path(args.out or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.name
    png = plot(runs, out_dir / f"{name}.png", f"byte-level GPT on the standard library, {args.workers} workers")
    meta = {"workers": args.workers, "corpus_files": files, "train_bytes": len(train), "val_bytes": len(val), **opts}
    path = write_json(name, {**meta, "runs": runs}, out_dir)
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    return runs


def summarize(runs: list[dict]) -> None:
    """Ratios to DDP fp32 (when it ran): validation loss, bytes sent, peak bytes per step."""
    base = next((r for r in runs if r["label"] == "DDP fp32"), None)
    for r in runs:
        if base:
            r["loss_vs_ddp"] = r["val_loss"] / base["val_loss"]
            r["fewer_bytes"] = base["sent_bytes"] / r["sent_bytes"] if r["sent_bytes"] else None
            r["fewer_wire_bytes"] = base["wire_bytes"] / r["wire_bytes"] if r["wire_bytes"] else None
    print()
    print(
        table(
            runs,
            [
                ("label", "configuration", ""),
                ("val_loss", "val loss", ".4f"),
                ("loss_vs_ddp", "vs DDP", ".3f"),
                ("sent_bytes", "bytes sent", ",.0f"),
                ("fewer_bytes", "fewer bytes", ".1f"),
                ("fewer_wire_bytes", "fewer wire bytes", ".1f"),
                ("peak_sent_bytes", "peak bytes/step", ",.0f"),
            ],
        )
    )


if __name__ == "__main__":
    main()
