"""DDP training-step time of every hook side by side, on NCCL or gloo.

For each model (torchvision ResNet-50 and ResNet-18, a GPT-style decoder of about 110M
parameters) on synthetic batches: the median time of a full training step (forward, backward
with the hook, optimizer step) for every hook of ours, for fp32 all-reduce (DDP's default),
torch's bf16_compress_hook and torch's powerSGD_hook; the compute-only time (the same step under
``no_sync``, nothing communicated); bytes each worker puts on the wire per step; and ratios to
fp32. torch's powerSGD_hook runs with one bucket holding the whole model under gloo: with several
buckets its P/Q all-reduces, issued from future callbacks, interleave differently on the ranks
and it aborts ("Received data size doesn't match expected size").

    python benchmarks/step_time.py --models resnet18 --workers 2          # local workers
    torchrun --nnodes 2 --nproc-per-node 8 ... benchmarks/step_time.py   # a cluster

With ``--fsdp R`` the model is sharded with FSDP2 and replicated ``R`` times (HSDP: under
torchrun on N nodes, ``--fsdp N`` shards inside each node): native HSDP runs beside every hook
of the catalog through ``register_fsdp`` (``benchmarks/fsdp.py``); MB are the library's bytes
between replicas per rank per step.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import launch  # noqa: E402
from benchmarks.common import comma_choices, listing, table, write_json  # noqa: E402
from benchmarks.models import NAMES as MODEL_NAMES
from benchmarks.models import build as build_model  # noqa: E402
from ddp_hooks import catalog  # noqa: E402
from ddp_hooks.compress.lowrank import LowRankPlan  # noqa: E402
from ddp_hooks.core.stats import wire_factor  # noqa: E402

TORCH_HOOKS = ("torch-bf16", "torch-powersgd")


def hooks() -> list[str]:
    """Every hook that runs here: torch's bf16_compress_hook needs CUDA and NCCL."""
    torch_hooks = TORCH_HOOKS if torch.cuda.is_available() else ("torch-powersgd",)
    return list(catalog.ENTRIES) + list(torch_hooks)


def _torch_hook(name, ddp, lr):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if name == "torch-bf16":
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    else:
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    return torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9)


def torch_wire_bytes(name: str, shapes, world: int) -> float:
    """Wire bytes per worker per step of torch's hooks (they do not count them)."""
    factor = wire_factor("all_reduce", world)
    numel = sum(torch.Size(s).numel() for s in shapes)
    if name == "torch-bf16":
        return 2 * numel * factor
    plan = LowRankPlan.build([torch.Size(s) for s in shapes], 4, 2.0)
    exact = sum(torch.Size(shapes[i]).numel() for i in plan.exact)
    return 4 * (plan.p_numel + plan.q_numel + exact) * factor


def _step(ddp, opt, x, y, loss_fn, dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss_fn(ddp(x), y).backward()
    opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _measure(rank, world, model_name, names, batch, steps, warmup, size, lr, options=None, counter=None, compute=True):
    """Per hook: the timed steps' times, bytes per step and codec time on this rank.

    ``options`` go to every catalog state (e.g. ``{"node_size": 2}``); ``counter``, when given,
    is read after a barrier before and after the timed steps (an independent byte counter,
    e.g. a link's): its difference per step is reported as ``counted_bytes``. ``compute``:
    also time the compute-only step (the same step under ``no_sync``).
    """
    dev = launch.device()
    out = {}
    gloo = dist.get_backend() == "gloo"
    for name in (["compute-only"] if compute else []) + names:
        torch.manual_seed(0)
        model, x, y, loss_fn = build_model(model_name, batch, size)
        model, x, y = model.to(dev), x.to(dev), y.to(dev)
        model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        one_bucket = name == "torch-powersgd" and gloo
        ddp = DDP(
            model,
            device_ids=[dev.index] if dev.type == "cuda" else None,
            bucket_cap_mb=model_mb + 1 if one_bucket else 25,
        )
        state = None
        if name == "compute-only":
            opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9)
        elif name in TORCH_HOOKS:
            opt = _torch_hook(name, ddp, lr)
        else:
            setup = catalog.build(name, ddp, lr, **(options or {}))
            opt, state = setup.optimizer, setup.state
        times, before, counted = [], None, None
        for i in range(warmup + steps):
            if i == warmup:
                counted = _count(counter)
                if state is not None:
                    before = state.stats()["total"]  # count the timed steps only
            if name == "compute-only":
                with ddp.no_sync():
                    t = _step(ddp, opt, x, y, loss_fn, dev)
            else:
                t = _step(ddp, opt, x, y, loss_fn, dev)
            times.append(t)
        if counted is not None:
            counted = (_count(counter) - counted) / steps
        delta = None
        if state is not None:
            after = state.stats()["total"]
            delta = {k: (after[k] - before[k]) / steps for k in ("wire_bytes", "compress_s", "decompress_s")}
        shapes = [tuple(p.shape) for p in model.parameters()]
        out[name] = {
            "times": times[warmup:],
            "wire_bytes": (
                delta["wire_bytes"] if delta else torch_wire_bytes(name, shapes, world) if name in TORCH_HOOKS else 0.0
            ),
            "codec_s": delta["compress_s"] + delta["decompress_s"] if delta else None,
            "counted_bytes": counted,
            "one_bucket": one_bucket,
            "params": sum(p.numel() for p in model.parameters()),
        }
        del ddp, opt, model
    return out


def _count(counter):
    """The counter's value once every rank has finished the steps before (None without one)."""
    if counter is None:
        return None
    dist.barrier()
    return counter()


def summarize(model_name: str, results: list[dict]) -> list[dict]:
    """One row per hook: median step time (slowest rank), ratios, bytes, floor."""
    names = list(results[0])
    step = {n: max(statistics.median(r[n]["times"]) for r in results) for n in names}
    compute = step["compute-only"]
    rows = []
    for n in names[1:]:
        wire = results[0][n]["wire_bytes"]
        rows.append(
            {
                "model": model_name,
                "hook": n,
                "step_ms": 1000 * step[n],
                "compute_ms": 1000 * compute,
                "vs_fp32": step["fp32"] / step[n] if "fp32" in step else None,
                # without CUDA torch's bf16 hook cannot run: ours, the same algorithm, stands in
                "vs_torch_bf16": step.get("torch-bf16", step.get("bf16", float("nan"))) / step[n],
                "vs_torch_powersgd": step.get("torch-powersgd", float("nan")) / step[n],
                "wire_mb": wire / 2**20,
                # bytes the worker's link sent per step (an independent counter, where one was read)
                "link_mb": (
                    statistics.mean(r[n]["counted_bytes"] for r in results) / 2**20
                    if results[0][n].get("counted_bytes") is not None
                    else None
                ),
                "codec_ms": 1000 * results[0][n]["codec_s"] if results[0][n]["codec_s"] else None,
                "one_bucket": results[0][n]["one_bucket"],
                "params": results[0][n]["params"],
            }
        )
    return rows


COLUMNS = [
    ("model", "model", ""),
    ("hook", "hook", ""),
    ("step_ms", "step ms", ".1f"),
    ("compute_ms", "compute ms", ".1f"),
    ("vs_fp32", "fp32/hook", ".2f"),
    ("vs_torch_bf16", "torch-bf16/hook", ".2f"),
    ("vs_torch_powersgd", "torch-psgd/hook", ".2f"),
    ("wire_mb", "wire MB/step", ".3f"),
    ("link_mb", "link MB/step", ".3f"),
    ("codec_ms", "codec ms", ".1f"),
]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet50,resnet18,gpt", help=listing(MODEL_NAMES))
    parser.add_argument("--hooks", default=",".join(hooks()), help=listing(hooks()))
    parser.add_argument("--batch", type=int, default=16, help="per-worker batch")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--size",
        default="full",
        choices=["full", "cifar", "tiny"],
        help="cifar: ResNets on 32x32 input; tiny: small models, for tests",
    )
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--workers", type=int, default=2, help="local workers when not under torchrun")
    parser.add_argument("--name", default=None, help="results file name (default step_time_<backend>)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--fsdp", type=int, default=0, metavar="R", help="HSDP with R replicas (FSDP2, torch 2.7+)")
    args = parser.parse_args(argv)
    names = comma_choices(parser, "--hooks", args.hooks, hooks())
    models = comma_choices(parser, "--models", args.models, MODEL_NAMES)
    if args.fsdp:
        return _main_fsdp(args, [n for n in names if n in catalog.ENTRIES], models)
    rows, world = [], 0
    for model_name in models:
        print(f"{model_name}: {', '.join(names)} ...", flush=True)
        results = launch.run(
            _measure, args.workers, model_name, names, args.batch, args.steps, args.warmup, args.size, args.lr
        )
        if results is not None:  # rank 0 (or the local launcher); the other torchrun ranks go on to the next model
            rows += summarize(model_name, results)
            world = len(results)
    if not rows:
        return []
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    print(
        f"\n{backend}, world size {world}, batch {args.batch}/worker; step = forward + backward + optimizer step "
        "(median, slowest rank); compute = the same under no_sync\n"
    )
    print(table(rows, COLUMNS))
    if backend == "gloo" and "torch-powersgd" in names:
        print("\ntorch-powersgd ran with one bucket holding the model: with several buckets under gloo it aborts.")
    if "torch-bf16" not in names:
        print(
            "torch's bf16_compress_hook needs CUDA and NCCL: the torch-bf16 column compares with ddp_hooks' bf16 "
            "(the same algorithm)."
        )
    path = write_json(
        args.name or f"step_time_{backend}",
        {"backend": backend, "world_size": world, "batch": args.batch, "rows": rows},
        args.out,
    )
    print(f"\nwrote {path}")
    return rows


def _fsdp_rank(rank: int, world: int, model_name: str, names: list[str], setting: dict) -> dict:
    from benchmarks import fsdp

    return {"fsdp": fsdp.measure(rank, world, model_name, names, setting)}


def _main_fsdp(args, names: list[str], models: list[str]) -> list[dict]:
    from benchmarks import fsdp

    setting = {"replicas": args.fsdp, "batch": args.batch, "steps": args.steps, "warmup": args.warmup}
    setting.update(size=args.size, lr=args.lr)
    rows: list[dict] = []
    for model_name in models:
        print(f"{model_name} (HSDP, {args.fsdp} replicas): {', '.join(names)} ...", flush=True)
        results = launch.run(_fsdp_rank, args.workers, model_name, names, setting)
        if results is not None:
            rows += fsdp.summarize(model_name, results, len(results))
    if not rows:
        return []
    print(table(rows, [c for c in fsdp.COLUMNS if c[0] not in ("link_mb", "bytes_ratio")]))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    path = write_json(args.name or f"step_time_fsdp_{backend}", {"backend": backend, **setting, "rows": rows}, args.out)
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
