"""Time- and bytes-to-accuracy per hook, on a real dataset.

Every configuration trains the same model from the same initialization on ``--workers`` local
ranks (gloo on CPU, NCCL when GPUs are present) and is evaluated every ``--eval-every`` steps on
the test set, on the mean of the ranks' models (algorithms with local models keep them apart;
the evaluation does not count as traffic). Recorded per point: step, training seconds, wire
bytes per worker, paper bits per worker, test loss and accuracy.

Data: CIFAR-10 through torchvision with ``--data-dir`` (a small CNN), otherwise scikit-learn's
handwritten digits, which ship with the package (an MLP), so it runs offline.

Suites:
  hooks    every hook of the catalog (the demo's settings)
  cser     CSER vs EF-SGD and Qsparse-local-SGD with the same shared-random compressor, and
           uncompressed SGD, at overall ratios 32, 256 and 1024 (the CSER paper's comparison)
  qsparse  bits to reach a target accuracy: SignTopK with H in {1, 4, 8}, synchronous and
           asynchronous (H = 8, staggered and random schedules), TopK-SGD, EF-signSGD and SGD
           (the Qsparse paper's Fig. 1c and Fig. 3 comparisons)
  nodes    every hook of the catalog flat and node-aware (``--node-size``, default 2: with the
           default 4 workers, 2 nodes of 2); node-aware wire bytes are the bytes between nodes
  fsdp     native HSDP and every hook of the catalog through ``register_fsdp`` on the model
           sharded over ``--node-size`` ranks and replicated across the rest (default: 2 x 2);
           wire bytes are the bytes between replicas (``benchmarks/fsdp.py``)

    python benchmarks/convergence.py --suite hooks
    python benchmarks/convergence.py --suite cser --steps 600
    python benchmarks/convergence.py --suite nodes --workers 4 --node-size 2
    python benchmarks/convergence.py --suite fsdp --workers 4 --node-size 2
"""

import argparse
import functools
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ddp_hooks as dh  # noqa: E402
from benchmarks import fsdp, launch  # noqa: E402
from benchmarks.common import RESULTS, comma_choices, table, write_json  # noqa: E402
from ddp_hooks import catalog, demo  # noqa: E402
from ddp_hooks.catalog import Setup  # noqa: E402


# ---------------------------------------------------------------- data and models
def load_data(data_dir: str | None):
    """(x_train, y_train, x_test, y_test, model factory, name)."""
    if data_dir is None:
        return (*demo.load_digits(0), demo.make_model, "digits")
    import torchvision

    def tensors(train):
        ds = torchvision.datasets.CIFAR10(data_dir, train=train, download=False)
        x = torch.tensor(ds.data, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
        return (x - 0.5) / 0.25, torch.tensor(ds.targets)

    x_train, y_train = tensors(True)
    x_test, y_test = tensors(False)
    return x_train, y_train, x_test, y_test, _cifar_cnn, "cifar10"


def _cifar_cnn() -> nn.Module:
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.Flatten(), nn.Linear(128 * 16, 10))


# ---------------------------------------------------------------- configurations
def _sgdm(ddp, lr):
    return torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9)


def build(ddp, lr, spec: dict) -> Setup:
    """A configuration from its description (picklable, so ranks can rebuild it)."""
    kind = spec["kind"]
    if kind == "catalog":
        return catalog.build(spec["name"], ddp, lr, **spec.get("options", {}))
    if kind == "cser":
        opt = _sgdm(ddp, lr * spec.get("lr_scale", 1.0))
        return Setup(opt, dh.CSER(**spec["args"]).register(ddp, opt))
    if kind == "qsparse":
        opt = _sgdm(ddp, lr * spec.get("lr_scale", 1.0))
        return Setup(opt, dh.QsparseLocalSGD(**spec["args"]).register(ddp, opt))
    if kind == "ef-sgd":
        opt = torch.optim.SGD(ddp.parameters(), lr=lr)
        return Setup(opt, dh.EFSignSGDM(momentum=0.0, **spec.get("args", {})).register(ddp, opt))
    raise ValueError(f"unknown configuration kind {kind!r}")


def suite(name: str, node_size: int = 2) -> list[dict]:
    if name == "hooks":
        return [{"label": n, "kind": "catalog", "name": n} for n in catalog.ENTRIES]
    if name == "nodes":
        out = []
        for n in catalog.ENTRIES:
            out.append({"label": f"{n} flat", "kind": "catalog", "name": n})
            out.append({"label": f"{n} node", "kind": "catalog", "name": n, "options": {"node_size": node_size}})
        return out
    if name == "fsdp":
        return [{"label": "native HSDP", "kind": "fsdp", "name": None}] + [
            {"label": n, "kind": "fsdp", "name": n} for n in catalog.ENTRIES
        ]
    if name == "cser":
        out = [{"label": "SGD", "rc": 1, "kind": "catalog", "name": "fp32"}]
        for rc in (32, 256, 1024):
            # CSER as in the released ImageNet configurations: both syncs get half the budget
            out.append(
                {
                    "label": f"CSER RC{rc}",
                    "rc": rc,
                    "kind": "cser",
                    "args": {"grad_ratio": 2 * rc, "model_ratio": 4, "period": rc // 2, "block_size": 1},
                }
            )
            # EF-SGD with the same shared-random compressor, every step
            out.append(
                {
                    "label": f"EF-SGD RC{rc}",
                    "rc": rc,
                    "kind": "qsparse",
                    "args": {"compressor": "grbs", "k": 1.0 / rc, "period": 1},
                }
            )
            # Qsparse-local-SGD with it, H = 8 (the released baseline's period)
            out.append(
                {
                    "label": f"Qsparse RC{rc}",
                    "rc": rc,
                    "kind": "qsparse",
                    "args": {"compressor": "grbs", "k": min(0.5, 8.0 / rc), "period": 8},
                }
            )
        return out
    if name == "qsparse":
        out = [{"label": "SGD", "kind": "catalog", "name": "fp32"}]
        for h in (1, 4, 8):
            out.append(
                {
                    "label": f"SignTopK H={h}",
                    "kind": "qsparse",
                    "args": {"compressor": "signtopk", "k": 0.01, "period": h},
                }
            )
        for schedule in ("staggered", "random"):  # asynchronous: each worker on its own steps
            out.append(
                {
                    "label": f"SignTopK H=8 {schedule}",
                    "kind": "qsparse",
                    "args": {"compressor": "signtopk", "k": 0.01, "period": 8, "schedule": schedule},
                }
            )
        out.append({"label": "TopK-SGD", "kind": "qsparse", "args": {"compressor": "topk", "k": 0.01, "period": 1}})
        out.append({"label": "EF-signSGD", "kind": "qsparse", "args": {"compressor": "sign", "period": 1}})
        return out
    raise ValueError(f"suite must be one of hooks, cser, qsparse, nodes, fsdp; got {name!r}")


# ---------------------------------------------------------------- one run
def _averaged_eval(model, x, y, batch=1000):
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            dist.all_reduce(p)
            p.div_(dist.get_world_size())
        model.eval()
        loss, correct = 0.0, 0
        for i in range(0, len(x), batch):
            logits = model(x[i : i + batch])
            loss += F.cross_entropy(logits, y[i : i + batch], reduction="sum").item()
            correct += (logits.argmax(1) == y[i : i + batch]).sum().item()
        model.train()
        for p, s in zip(params, saved):
            p.copy_(s)
    return loss / len(x), correct / len(x)


def _run(rank, world, spec, steps, eval_every, batch, lr, data_dir, seed, node_size=2):
    dev = launch.device()
    x_train, y_train, x_test, y_test, make_model, _ = load_data(data_dir)
    x_local, y_local = x_train[rank::world].to(dev), y_train[rank::world].to(dev)
    x_test, y_test = x_test.to(dev), y_test.to(dev)
    torch.manual_seed(seed)
    model = make_model().to(dev)
    if spec["kind"] == "fsdp":  # sharded over node_size ranks, replicated across the rest
        sharded = fsdp.Sharded(model, fsdp.mesh_of(world // node_size, world, dev), spec["name"], lr)
        wrapped, optimizer = model, sharded.optimizer
        evaluate, traffic = sharded.evaluate, sharded.traffic
    else:
        wrapped = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        setup = build(wrapped, lr, spec)
        optimizer = setup.optimizer
        evaluate = functools.partial(_averaged_eval, model)

        def traffic(done: int) -> dict:
            return {k: setup.state.stats()["total"][k] for k in ("wire_bytes", "paper_bits")}

    g = torch.Generator().manual_seed(seed * 1000 + rank)
    points, elapsed = [], 0.0
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x_local), (batch,), generator=g).to(dev)
        t0 = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(wrapped(x_local[idx]), y_local[idx]).backward()
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        if step % eval_every == 0 or step == steps:
            loss, acc = evaluate(x_test, y_test)
            points.append({"step": step, "seconds": elapsed, **traffic(step), "test_loss": loss, "accuracy": acc})
    return points


def _to_target(points, target):
    for p in points:
        if p["accuracy"] >= target:
            return p
    return None


PALETTE = [f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray", "olive", "cyan")]
PALETTE += ["navy", "gold", "lime", "maroon", "teal", "magenta", "black", "salmon", "darkkhaki", "slateblue"]
LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)))


def styles(labels: list[str]) -> dict[str, tuple[str, object]]:
    """(colour, line style) of each curve: a label is ``<hook> [<mode>]``; each hook its own
    colour (up to 20), each mode (flat / node, RC, H) its own line style."""
    hooks = list(dict.fromkeys(label.split(" ", 1)[0] for label in labels))
    modes = list(dict.fromkeys(label.partition(" ")[2] for label in labels))
    palette = [
        f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray", "olive", "cyan")
    ]
    palette += ["navy", "gold", "lime", "maroon", "teal", "magenta", "black", "salmon", "darkkhaki", "slateblue"]
    return {
        label: (
            palette[hooks.index(label.split(" ", 1)[0]) % len(palette)],
            LINE_STYLES[modes.index(label.partition(" ")[2]) % len(LINE_STYLES)],
        )
        for label in labels
    }


def plot(runs: list[dict], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    style = styles([run["label"] for run in runs])
    for run in runs:
        pts = run["points"]
        acc = [p["accuracy"] for p in pts]
        color, line = style[run["label"]]
        look = {"marker": ".", "label": run["label"], "color": color, "linestyle": line}
        axes[0].plot([max(p["wire_bytes"], 1) for p in pts], acc, **look)
        axes[1].plot([p["seconds"] for p in pts], acc, **look)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("bytes sent per worker (wire)")
    axes[1].set_xlabel("training seconds")
    for ax in axes:
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="hooks", choices=["hooks", "cser", "qsparse", "nodes", "fsdp"])
    parser.add_argument("--node-size", type=int, default=2, help="ranks per node (suites nodes, fsdp)")
    parser.add_argument("--only", default=None, help="comma-separated labels to run (default: the whole suite)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--batch", type=int, default=32, help="per-worker batch")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--target", type=float, default=0.9, help="accuracy for the *-to-target columns")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 root (torchvision layout); default: digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)

    if args.suite in ("nodes", "fsdp") and (
        args.node_size < 2 or args.workers % args.node_size or args.workers == args.node_size
    ):
        parser.error(f"--suite {args.suite} needs --node-size >= 2 dividing --workers into at least 2 nodes")
    specs = suite(args.suite, args.node_size)
    if args.only:
        wanted = set(comma_choices(parser, "--only", args.only, [s["label"] for s in specs]))
        specs = [s for s in specs if s["label"] in wanted]
    dataset = load_data(args.data_dir)[-1]
    runs = []
    for i, spec in enumerate(specs, 1):
        print(f"[{i}/{len(specs)}] {spec['label']} ...", flush=True)
        results = launch.run(
            _run,
            args.workers,
            spec,
            args.steps,
            args.eval_every,
            args.batch,
            args.lr,
            args.data_dir,
            args.seed,
            args.node_size,
        )
        if results is None:  # another torchrun rank: it takes part in every run, rank 0 reports
            continue
        points = results[0]
        last = points[-1]
        hit = _to_target(points, args.target)
        runs.append(
            {
                "label": spec["label"],
                "spec": spec,
                "points": points,
                "final_accuracy": last["accuracy"],
                "final_loss": last["test_loss"],
                "wire_bytes": last["wire_bytes"],
                "paper_bits": last["paper_bits"],
                "steps_to_target": hit["step"] if hit else None,
                "bytes_to_target": hit["wire_bytes"] if hit else None,
                "bits_to_target": hit["paper_bits"] if hit else None,
                "seconds_to_target": hit["seconds"] if hit else None,
            }
        )
    if not runs:
        return []
    sgd = next((r for r in runs if r["label"] in ("SGD", "fp32", "native HSDP")), None)
    for r in runs:
        r["bits_vs_sgd"] = (
            sgd["bits_to_target"] / r["bits_to_target"]
            if sgd and sgd["bits_to_target"] and r["bits_to_target"]
            else None
        )
    print(f"\n{dataset}, {args.workers} workers, {args.steps} steps, target accuracy {args.target}\n")
    print(
        table(
            runs,
            [
                ("label", "configuration", ""),
                ("final_accuracy", "final acc", ".3f"),
                ("final_loss", "final loss", ".3f"),
                ("wire_bytes", "wire bytes", ",.0f"),
                ("paper_bits", "paper bits", ".3g"),
                ("steps_to_target", "steps to target", ""),
                ("bits_to_target", "bits to target", ".3g"),
                ("bytes_to_target", "bytes to target", ".3g"),
                ("bits_vs_sgd", "SGD bits / bits", ".1f"),
            ],
        )
    )
    out_dir = Path(args.out or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"convergence_{args.suite}_{dataset}"
    png = plot(runs, out_dir / f"{name}.png", f"{args.suite} on {dataset}, {args.workers} workers")
    path = write_json(
        name,
        {
            "suite": args.suite,
            "dataset": dataset,
            "workers": args.workers,
            "steps": args.steps,
            "target": args.target,
            "runs": runs,
        },
        out_dir,
    )
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    return runs


if __name__ == "__main__":
    main()
