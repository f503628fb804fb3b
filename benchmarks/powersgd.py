"""PowerSGD hook time per step: ours against torch's powerSGD_hook, side by side.

On the gradient shapes of ResNet-50 and of a GPT-2-style transformer (124M parameters), each
rank runs DDP backward passes whose gradients are fixed random tensors; the hook time is the
median backward time with the hook minus the median with a hook that communicates nothing.

Configurations (same rank everywhere):
  torch-default   torch's powerSGD_hook, default settings, one bucket holding the model
  torch-batched   the same with batch_tensors_with_same_shape=True
  ours-1bucket    ddp_hooks.PowerSGD, one bucket holding the model
  ours-25mb       ddp_hooks.PowerSGD, DDP's default 25 MB buckets (several in flight)
torch's hook runs with one bucket because with several under gloo its P/Q all-reduces,
issued from future callbacks, interleave differently on the ranks and it aborts.

It also times the three orthogonalization methods on every model's P matrices.

    python benchmarks/powersgd.py                      # 2 local workers (gloo on CPU / NCCL)
    torchrun --nproc-per-node 8 benchmarks/powersgd.py # on a cluster
"""

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ddp_hooks as dh  # noqa: E402
from benchmarks import launch  # noqa: E402
from benchmarks.common import comma_choices, listing, median, table, write_json  # noqa: E402
from benchmarks.shapes import MODELS, ShapeBag  # noqa: E402
from ddp_hooks.compress.lowrank import LowRankPlan  # noqa: E402
from ddp_hooks.compress.orthogonalize import METHODS, orthogonalize  # noqa: E402

CONFIGS = ["noop", "torch-default", "torch-batched", "ours-1bucket", "ours-25mb"]


def _noop(state, bucket):
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _register(config: str, model, rank: int):
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as tp

    one_bucket = 1 + sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    ddp = DDP(model, bucket_cap_mb=25 if config == "ours-25mb" else one_bucket)
    if config == "noop":
        ddp.register_comm_hook(None, _noop)
    elif config.startswith("torch"):
        state = tp.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=rank,
            start_powerSGD_iter=2,
            batch_tensors_with_same_shape=config == "torch-batched",
        )
        ddp.register_comm_hook(state, tp.powerSGD_hook)
    else:
        dh.PowerSGD(rank=rank).register(ddp)
    return ddp


def _measure(rank: int, world: int, model_name: str, matrix_rank: int, steps: int, warmup: int):
    dev = launch.device()
    shapes = MODELS[model_name]()
    g = torch.Generator().manual_seed(rank)
    coeffs = [torch.randn(s, generator=g).to(dev) for s in shapes]
    out = {}
    for config in CONFIGS:
        model = ShapeBag(shapes).to(dev)
        ddp = _register(config, model, matrix_rank)
        times = []
        for _ in range(warmup + steps):
            model.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            ddp(coeffs).backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[config] = times[warmup:]
        del ddp, model
        gc.collect()
    return out


def _orthogonalization(model_name: str, matrix_rank: int, repeats: int, dev: torch.device) -> dict:
    plan = LowRankPlan.build([torch.Size(s) for s in MODELS[model_name]()], matrix_rank, 2.0)
    ps = [torch.randn(g.size, g.n, g.rank, device=dev) for g in plan.groups]
    out = {}
    for method in METHODS:
        times = []
        for _ in range(repeats + 2):
            work = [p.clone() for p in ps]
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for p in work:
                orthogonalize(p, method)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[method] = 1000 * median(times[2:])
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet50,gpt", help=listing(MODELS))
    parser.add_argument("--rank", type=int, default=4, help="PowerSGD rank (default 4)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (torch's hook compresses from step 2)"
    )
    parser.add_argument("--workers", type=int, default=2, help="local workers when not under torchrun")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="measure every configuration this many times and keep the fastest median "
        "(shared machines drift between configurations)",
    )
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)

    rows, orth_rows = [], []
    for model_name in comma_choices(parser, "--models", args.models, MODELS):
        print(f"{model_name}: timing {', '.join(CONFIGS)} ...", flush=True)
        backward = {}
        for _ in range(args.rounds):
            results = launch.run(_measure, args.workers, model_name, args.rank, args.steps, args.warmup)
            if results is None:  # another torchrun rank: it takes part in every run, rank 0 reports
                continue
            world = len(results)
            for c in CONFIGS:
                t = median([median(r[c]) for r in results]) * 1000
                backward[c] = min(backward.get(c, t), t)
        if not backward:
            continue
        base = backward["noop"]
        for c in CONFIGS[1:]:
            hook = backward[c] - base
            rows.append(
                {
                    "model": model_name,
                    "config": c,
                    "backward_ms": backward[c],
                    "hook_ms": hook,
                    "speedup_vs_torch_default": (backward["torch-default"] - base) / hook if hook > 0 else None,
                    "speedup_vs_torch_batched": (backward["torch-batched"] - base) / hook if hook > 0 else None,
                }
            )
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        orth = _orthogonalization(model_name, args.rank, 10, dev)
        orth_rows.append({"model": model_name, **{f"{m}_ms": v for m, v in orth.items()}})
    if not rows:
        return
    print(f"\nworld size {world}, rank {args.rank}; hook ms = backward with hook - backward with a no-op hook\n")
    print(
        table(
            rows,
            [
                ("model", "model", ""),
                ("config", "config", ""),
                ("backward_ms", "backward ms", ".1f"),
                ("hook_ms", "hook ms", ".1f"),
                ("speedup_vs_torch_default", "vs torch default", ".2f"),
                ("speedup_vs_torch_batched", "vs torch batched", ".2f"),
            ],
        )
    )
    print("\northogonalization of all P's of a model (ms, median)\n")
    print(table(orth_rows, [("model", "model", "")] + [(f"{m}_ms", m, ".2f") for m in METHODS]))
    device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    path = write_json(
        f"powersgd_{device_kind}",
        {
            "world_size": world,
            "rank": args.rank,
            "steps": args.steps,
            "rounds": args.rounds,
            "hooks": rows,
            "orthogonalization": orth_rows,
        },
        args.out,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
