"""Which hook, if any, pays off on a given network? A step-time model.

    step = compute + codec + max(network, contention)
    network = sum over collectives of  bytes_factor * S / bandwidth + steps * latency

with the usual costs per worker for a payload of ``S`` bytes on ``n`` ranks: ring all-reduce
``2(n-1)/n S`` and ``2(n-1)`` latency steps; all-gather ``(n-1) S`` and ``n-1`` steps; all-to-all
``(n-1)/n S`` and ``n-1`` steps (the sharded two-way exchange is an all-to-all plus an
all-gather). ``compute`` is the measured time of a step that communicates nothing (``no_sync``);
``codec`` is each hook's measured encode/decode time (the JSON's ``codec_ms``; it runs in
series with the messages it produces), ``contention`` the rest of what a step costs beyond
compute on a fast network (bookkeeping, and the reduction work of the collectives competing
with backward for the cores), calibrated from a measured step on a fast network
(``benchmarks/step_time.py`` or ``emulate.py`` output): ``contention = step - compute - codec
- network`` there. On a slow link that work hides behind the transfer, hence the max.
Communication is otherwise assumed not to overlap with backward.

    python benchmarks/advisor.py --params 11.7e6 --compute-ms 400 --world 4 --bandwidth 1gbit
    python benchmarks/advisor.py --measured benchmarks/results/step_time_gloo.json --model resnet18 --bandwidth 100mbit
    python benchmarks/advisor.py --validate benchmarks/results/emulate_*.json

Two-level clusters (``--nodes N --per-node L``): ``N`` nodes of ``L`` workers, a fast network
inside a node (``--intra-bandwidth``, e.g. NVLink) and the slow one between nodes, one NIC per
node that its ``L`` workers share. Flat, each of the ``n = N L`` workers runs the hook over all
of them: a ring (all-reduce, all-gather) crosses each node's NIC once, while for an
all-to-all the share ``(n - L)/(n - 1)`` of every worker's bytes leaves the node, ``L`` workers'
worth through one NIC. Node-aware (``node_size=L``), a bucket costs two fp32
all-reduces on ``L`` ranks inside the node (the exact mean and the gather), and between the
nodes the hook runs on ``N`` workers per share, the ``L`` shares through the one NIC: the
whole model's message, once per node. Each worker's codec time drops to ``1/L``.

    python benchmarks/advisor.py --model resnet50 --compute-ms 150 --nodes 4 --per-node 8 --bandwidth 10gbit

It predicts speed only: check what a hook does to accuracy with benchmarks/convergence.py.
"""

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.models import build as build_model  # noqa: E402
from ddp_hooks.compress.lowrank import LowRankPlan  # noqa: E402

BUCKET_BYTES = 25 * 2**20

# (collective, bytes per gradient element, collectives per bucket) per hook at the catalog's
# settings; see each algorithm's module for where the bytes come from
_COSTS = {
    "fp32": [("all_reduce", 4.0)],
    "fp16": [("all_reduce", 2.0)],
    "bf16": [("all_reduce", 2.0)],
    "torch-bf16": [("all_reduce", 2.0)],
    "ef-sgdm": [("all_to_all", 1 / 8), ("all_gather_shard", 1 / 8)],  # signs; scales added below
    "cser": [("all_reduce", 4 / 64), ("all_reduce", 4 / 4 / 16)],  # grad 1/64 + reset 1/4 every 16
    "qsparse": [("all_gather", 0.01 * (4 + 1 / 8) / 4)],  # SignTopK 1% (int32 index + sign) every 4 steps
}
_NOT_MODELLED = {"laq": "uploads depend on the data (a full-gradient method); measure it"}


@dataclass
class Prediction:
    hook: str
    step_s: float
    network_s: float
    overhead_s: float  # codec + the part of contention not hidden by the network
    wire_bytes: float


def parse_rate(text: str | float) -> float:
    """'100mbit', '1gbit', '10gbit', '1.25GB' or a number of bits per second -> bytes per second."""
    if isinstance(text, (int, float)):
        return float(text) / 8
    m = re.fullmatch(r"\s*([0-9.e+]+)\s*([kmgt]?)(bit|b|B|bps)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"bandwidth must look like 100mbit, 1gbit or 1.25GB, got {text!r}")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    return value if m.group(3) == "B" else value / 8


def _factor(kind: str, n: int) -> tuple[float, int]:
    """(wire bytes per payload byte, latency steps) per worker."""
    return {
        "all_reduce": (2 * (n - 1) / n, 2 * (n - 1)),
        "all_gather": (float(n - 1), n - 1),
        "all_gather_shard": ((n - 1) / n, n - 1),  # the sharded exchange's all-gather of 1/n-size shards
        "all_to_all": ((n - 1) / n, n - 1),
    }[kind]


def network_time(hook: str, shapes: list[tuple[int, ...]], world: int, bandwidth: float, latency: float):
    """(seconds, wire bytes) per worker per step for ``hook`` (bandwidth in bytes/s)."""
    numel = sum(math.prod(s) for s in shapes)
    buckets = max(1, math.ceil(4 * numel / BUCKET_BYTES))
    if world <= 1:
        return 0.0, 0.0
    if hook in ("powersgd", "torch-powersgd"):
        plan = LowRankPlan.build(shapes, 4, 2.0)
        exact = sum(math.prod(shapes[i]) for i in plan.exact)
        f, steps = _factor("all_reduce", world)
        wire = 4 * (plan.p_numel + plan.q_numel + exact) * f
        return wire / bandwidth + 3 * buckets * steps * latency, wire
    if hook not in _COSTS:
        raise ValueError(f"hook {hook!r} is not modelled: {_NOT_MODELLED.get(hook, 'unknown hook')}")
    seconds = wire = 0.0
    for kind, per_element in _COSTS[hook]:
        f, steps = _factor(kind, world)
        payload = per_element * numel
        if hook == "ef-sgdm":
            payload += 4 * (len(shapes) + world)  # one fp32 scale per block and shard piece
        wire += payload * f
        seconds += payload * f / bandwidth + buckets * steps * latency
    return seconds, wire


def _kinds(hook: str, shapes: list[tuple[int, ...]]) -> list[tuple[str, float]]:
    """(collective, payload bytes) per step for ``hook`` on a model of ``shapes``."""
    numel = sum(math.prod(s) for s in shapes)
    if hook in ("powersgd", "torch-powersgd"):
        plan = LowRankPlan.build(shapes, 4, 2.0)
        exact = sum(math.prod(shapes[i]) for i in plan.exact)
        return [("all_reduce", 4.0 * (plan.p_numel + plan.q_numel + exact))]
    if hook not in _COSTS:
        raise ValueError(f"hook {hook!r} is not modelled: {_NOT_MODELLED.get(hook, 'unknown hook')}")
    return [
        (kind, per_element * numel + (4 * len(shapes) if hook == "ef-sgdm" else 0))
        for kind, per_element in _COSTS[hook]
    ]


def two_level_time(hook: str, shapes, nodes: int, per_node: int, inter: float, intra: float, node_aware: bool):
    """(seconds, inter-node bytes per node) per step of ``hook`` on ``nodes`` nodes of
    ``per_node`` workers sharing one NIC of ``inter`` bytes/s, ``intra`` bytes/s inside a node."""
    n = nodes * per_node
    numel = sum(math.prod(s) for s in shapes)
    seconds = node_bytes = 0.0
    if node_aware and per_node > 1:
        f, _ = _factor("all_reduce", per_node)
        seconds += 2 * 4 * numel * f / intra  # the exact mean and the gather inside the node
    for kind, payload in _kinds(hook, shapes):
        if node_aware:  # N workers per share, every share through the node's one NIC
            f, _ = _factor(kind, nodes)
            out = payload * f
        elif kind == "all_to_all":  # direct sends: what leaves the node of each of its L workers
            f, _ = _factor(kind, n)
            out = per_node * payload * f * (n - per_node) / (n - 1)
        else:  # rings (all-reduce, all-gather) cross each node's NIC once
            f, _ = _factor(kind, n)
            out = payload * f
        node_bytes += out
        seconds += out / inter
    return seconds, node_bytes


def predict_nodes(shapes, nodes: int, per_node: int, compute_s: float, inter: float, intra: float, codec=None):
    """Rows of (hook, flat step, node-aware step, inter-node bytes per node flat and node-aware);
    ``codec``: seconds of codec per hook for the whole model (node-aware: divided by L)."""
    rows = []
    for hook in hooks():
        c = (codec or {}).get(hook, 0.0)
        flat, flat_bytes = two_level_time(hook, shapes, nodes, per_node, inter, intra, False)
        node, node_bytes = two_level_time(hook, shapes, nodes, per_node, inter, intra, True)
        rows.append(
            {
                "hook": hook,
                "flat_ms": 1000 * (compute_s + c + flat),
                "node_ms": 1000 * (compute_s + c / per_node + node),
                "flat_mb": flat_bytes / 2**20,
                "node_mb": node_bytes / 2**20,
            }
        )
    return sorted(rows, key=lambda r: min(r["flat_ms"], r["node_ms"]))


def hooks() -> list[str]:
    return list(_COSTS) + ["powersgd", "torch-powersgd"]


def predict(
    shapes,
    world: int,
    compute_s: float,
    bandwidth: float,
    latency: float = 0.0,
    overhead_s: dict[str, float | tuple[float, float]] | None = None,
    names=None,
) -> list[Prediction]:
    """Predicted step time of each hook; ``bandwidth`` in bytes per second. ``overhead_s`` per
    hook: seconds of codec, or (codec, contention) as :func:`calibrate` returns them."""
    out = []
    for hook in names or hooks():
        net, wire = network_time(hook, shapes, world, bandwidth, latency)
        extra = (overhead_s or {}).get(hook, 0.0)
        codec, contention = extra if isinstance(extra, tuple) else (extra, 0.0)
        step = compute_s + codec + max(net, contention)
        out.append(Prediction(hook, step, net, max(0.0, step - compute_s - net), wire))
    return sorted(out, key=lambda p: p.step_s)


def calibrate(measured: dict, shapes, bandwidth: float, latency: float) -> tuple[float, dict]:
    """(compute seconds, {hook: (codec, contention) seconds}) from a measured step-time table at
    a known bandwidth: codec = the measured encode/decode time (0 where not reported),
    contention = step - compute - codec - modelled network time, never below 0."""
    rows = measured["rows"]
    compute = rows[0]["compute_ms"] / 1000
    world = measured["world_size"]
    overhead = {}
    for r in rows:
        if r["hook"] in hooks():
            net, _ = network_time(r["hook"], shapes, world, bandwidth, latency)
            codec = min((r.get("codec_ms") or 0.0) / 1000, max(0.0, r["step_ms"] / 1000 - compute))
            overhead[r["hook"]] = (codec, max(0.0, r["step_ms"] / 1000 - compute - codec - net))
    return compute, overhead


def advise(predictions: list[Prediction]) -> str:
    """A one-paragraph answer: the fastest hook and what it saves against fp32 and bf16."""
    by = {p.hook: p for p in predictions}
    best = predictions[0]
    fp32 = by.get("fp32")
    if best.hook == "fp32" or fp32 is None:
        return "No hook pays off here: fp32 all-reduce is predicted fastest."
    lines = [
        f"Use {best.hook}: predicted {best.step_s * 1000:.0f} ms/step vs {fp32.step_s * 1000:.0f} ms "
        f"for fp32 ({fp32.step_s / best.step_s:.2f}x)"
    ]
    bf16 = by.get("bf16") or by.get("torch-bf16")
    if bf16 is not None:
        lines.append(f" and {bf16.step_s * 1000:.0f} ms for bf16 ({bf16.step_s / best.step_s:.2f}x)")
    return "".join(lines) + " (speed only: check accuracy with benchmarks/convergence.py)."


def shapes_of(model: str, size: str = "full") -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in build_model(model, 1, size)[0].parameters()]


def _shapes_for(args) -> list[tuple[int, ...]]:
    if args.model:
        return shapes_of(args.model, args.size)
    # a bag of square matrices of the given total size: enough for the byte models
    n = int(float(args.params))
    side = 1024
    return [(side, side)] * (n // side**2) + [(n % side**2,)] * (n % side**2 > 0)


def validate(paths: list[str], shapes_of) -> list[dict]:
    """Compare predictions with emulate.py measurements: calibrate each hook's overhead on the
    unshaped run of each model, predict the shaped runs from their own compute-only time (as a
    user predicts from a compute time measured on their machine). Returns rows with the
    relative error."""
    runs = [json.load(open(p)) for p in paths]
    rows = []
    for base in [r for r in runs if r.get("rate") in (None, "unshaped")]:
        for model in {row["model"] for row in base["rows"]}:
            shapes = shapes_of(model, base.get("size", "full"))
            sub = {**base, "rows": [r for r in base["rows"] if r["model"] == model]}
            fast = parse_rate(base.get("measured_rate", "10gbit"))
            compute, overhead = calibrate(sub, shapes, fast, 0.0)
            for run in runs:
                if run is base or run.get("rate") in (None, "unshaped"):
                    continue
                bw = parse_rate(run.get("measured_rate") or run["rate"])
                if run.get("link") == "shared":  # one link for all: each worker gets 1/n when all send
                    bw /= run["world_size"]
                latency = float(run.get("delay_ms", 0.0)) / 1000
                for r in [r for r in run["rows"] if r["model"] == model and r["hook"] in hooks()]:
                    # compute-only time is measured in every run (no communication in it)
                    own = r.get("compute_ms")
                    step_compute = own / 1000 if own else compute
                    p = predict(shapes, run["world_size"], step_compute, bw, latency, overhead, [r["hook"]])[0]
                    rate = run["rate"] + (" shared" if run.get("link") == "shared" else "")
                    rows.append(
                        {
                            "model": model,
                            "rate": rate,
                            "hook": r["hook"],
                            "measured_ms": r["step_ms"],
                            "predicted_ms": 1000 * p.step_s,
                            "error": 1000 * p.step_s / r["step_ms"] - 1,
                        }
                    )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["resnet18", "resnet50", "gpt"], help="take the shapes of this model")
    parser.add_argument("--size", default="full", choices=["full", "cifar", "tiny"])
    parser.add_argument("--params", default="25.6e6", help="model size when --model is not given")
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--compute-ms", type=float, default=None, help="measured compute-only step time")
    parser.add_argument("--measured", default=None, help="a step_time.py / emulate.py JSON to calibrate on")
    parser.add_argument("--measured-rate", default="10gbit", help="the bandwidth that JSON was measured at")
    parser.add_argument("--bandwidth", default="10gbit", help="e.g. 100mbit, 1gbit, 25gbit")
    parser.add_argument("--latency-ms", type=float, default=0.05)
    parser.add_argument("--validate", nargs="+", default=None, help="emulate.py JSON files")
    parser.add_argument("--nodes", type=int, default=0, help="a two-level cluster of this many nodes")
    parser.add_argument("--per-node", type=int, default=8, help="workers per node (with --nodes)")
    parser.add_argument("--intra-bandwidth", default="1.6tbit", help="inside a node (e.g. NVLink), with --nodes")
    args = parser.parse_args(argv)
    if args.nodes:
        _two_level(args, parser)
        return
    if args.validate:
        rows = validate(args.validate, shapes_of)
        print(f"{'model':>9} {'rate':>14} {'hook':>15} {'measured ms':>12} {'predicted ms':>13} {'error':>7}")
        for r in rows:
            print(
                f"{r['model']:>9} {r['rate']:>14} {r['hook']:>15} {r['measured_ms']:12.1f} "
                f"{r['predicted_ms']:13.1f} {r['error']:+7.1%}"
            )
        if rows:
            print(f"\nmean |error| {sum(abs(r['error']) for r in rows) / len(rows):.1%} over {len(rows)} predictions")
        return
    shapes = _shapes_for(args)
    overhead = None
    compute = None if args.compute_ms is None else args.compute_ms / 1000
    world = args.world
    if args.measured:
        measured = json.load(open(args.measured))
        if args.model:
            measured = {**measured, "rows": [r for r in measured["rows"] if r["model"] == args.model]}
        compute, overhead = calibrate(measured, shapes, parse_rate(args.measured_rate), 0.0)
        world = measured["world_size"]
    if compute is None:
        parser.error("give --compute-ms (a measured step under no_sync) or --measured")
    preds = predict(shapes, world, compute, parse_rate(args.bandwidth), args.latency_ms / 1000, overhead)
    numel = sum(math.prod(s) for s in shapes)
    print(
        f"{numel / 1e6:.1f}M parameters, {world} workers, {args.bandwidth}, latency {args.latency_ms} ms, "
        f"compute {compute * 1000:.0f} ms\n"
    )
    print(f"{'hook':>15} {'step ms':>9} {'network ms':>11} {'overhead ms':>12} {'wire MB':>9}")
    for p in preds:
        print(
            f"{p.hook:>15} {p.step_s * 1000:9.1f} {p.network_s * 1000:11.1f} {p.overhead_s * 1000:12.1f} "
            f"{p.wire_bytes / 2**20:9.2f}"
        )
    print("\n" + advise(preds))
    for hook, why in _NOT_MODELLED.items():
        print(f"({hook} is not predicted: {why})")


def _two_level(args, parser) -> None:
    if args.nodes < 2 or args.per_node < 1:
        parser.error("--nodes must be at least 2 and --per-node at least 1")
    if args.compute_ms is None:
        parser.error("give --compute-ms (a measured step under no_sync)")
    shapes = _shapes_for(args)
    inter, intra = parse_rate(args.bandwidth), parse_rate(args.intra_bandwidth)
    rows = predict_nodes(shapes, args.nodes, args.per_node, args.compute_ms / 1000, inter, intra)
    print(f"{args.nodes} nodes x {args.per_node} workers, {args.bandwidth} per node, {args.intra_bandwidth} inside\n")
    print(f"{'hook':>15} {'flat ms':>9} {'node ms':>9} {'flat MB/node':>13} {'node MB/node':>13}")
    for r in rows:
        print(f"{r['hook']:>15} {r['flat_ms']:9.1f} {r['node_ms']:9.1f} {r['flat_mb']:13.2f} {r['node_mb']:13.2f}")
    best = rows[0]
    mode = f"node_size={args.per_node}" if best["node_ms"] < best["flat_ms"] else "flat"
    print(f"\nfastest: {best['hook']} ({mode}); speed only: check accuracy with benchmarks/convergence.py")


if __name__ == "__main__":
    main()
