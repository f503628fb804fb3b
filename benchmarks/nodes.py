"""Emulated multi-node clusters for ``emulate.py --nodes N --workers-per-node L``.

One network namespace per node, joined to the others by the node's shaped link (its NIC, or
with ``--link shared`` one link for all nodes). The node's ``L`` workers run inside its
namespace and talk to each other over the node's own loopback, unshaped, as GPUs of one node
talk over NVLink or PCIe; everything between nodes crosses the shaped link. Each worker gets
torchrun's environment (``RANK = node * L + local_rank``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``),
so the node-aware mode finds its nodes with ``node_size="auto"``.

In one launch every hook runs flat (``node_size=None``) and node-aware, plus the compute-only
step. Local rank 0 of every node reads its node's inter-node byte counter before and after the
timed steps: the shaper's own counter (``tc -s qdisc``: bytes the node's link sent, headers
included), or, where the link is not shaped per node, the kernel's transmit counter of the
node's interface. Those counts are independent of the library's own ``stats()``, which are
reported beside them.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# hooks whose inter-node bytes per node must drop to 1/L node-aware (plus scales and headers)
BYTE_GOAL_HOOKS = ("ef-sgdm", "qsparse", "laq")
# hooks that must be at least 1.3x faster node-aware at 1 Gb/s
SPEED_GOAL_HOOKS = ("ef-sgdm", "qsparse")
BYTE_SLACK = 1.10  # scales, flags and TCP/IP headers on top of 1/L
SPEEDUP_GOAL = 1.3
SLOWDOWN_LIMIT = 1.05


def link_bytes(iface: str) -> int:
    """Bytes this namespace's ``iface`` has sent: its root qdisc's counter when it is shaped
    (tc's ``Sent N bytes``), else the kernel's transmit counter of the interface."""
    text = subprocess.run(
        ["tc", "-s", "qdisc", "show", "dev", iface, "root"], capture_output=True, text=True, check=True
    ).stdout
    if "noqueue" not in text.split("\n", 1)[0]:
        sent = re.search(r"Sent (\d+) bytes", text)
        if sent:
            return int(sent.group(1))
    return int(Path(f"/sys/class/net/{iface}/statistics/tx_bytes").read_text())


def worker(args) -> None:
    """One rank inside its node's namespace: every hook flat and node-aware, to a JSON file."""
    import torch.distributed as dist

    from benchmarks import fsdp, step_time
    from ddp_hooks import catalog

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", store=dist.FileStore(args.store, world), rank=rank, world_size=world)
    iface = os.environ["GLOO_SOCKET_IFNAME"]
    counter = (lambda: link_bytes(iface)) if os.environ["LOCAL_RANK"] == "0" else (lambda: 0)
    hooks = args.hooks.split(",")
    ours = [h for h in hooks if h in catalog.ENTRIES]
    if args.fsdp:  # one replica per node, sharded over the node's workers
        setting = {"replicas": args.nodes, "batch": args.batch, "steps": args.steps, "warmup": args.warmup}
        setting.update(size=args.size, lr=0.01)
        result = {"fsdp": fsdp.measure(rank, world, args.model, ours, setting, counter=counter)}
    else:
        common = (rank, world, args.model)
        rest = (args.batch, args.steps, args.warmup, args.size, 0.01)
        flat = step_time._measure(*common, hooks, *rest, counter=counter)
        node = step_time._measure(*common, ours, *rest, options={"node_size": "auto"}, counter=counter, compute=False)
        result = {"flat": flat, "node": node}
    Path(args.result).write_text(json.dumps(result))
    dist.barrier()  # no rank tears its connections down while another still reads from them
    dist.destroy_process_group()


def launch(topo, args, model: str, hooks: list[str]) -> list[dict]:
    """Start ``nodes * workers_per_node`` workers, node ``i`` in namespace ``i``; their results."""
    from benchmarks.common import wait_all

    nodes, per_node = args.nodes, args.workers_per_node
    world = nodes * per_node
    with tempfile.TemporaryDirectory(prefix="ddph_nodes_") as tmp:
        procs = []
        for rank in range(world):
            node, local = divmod(rank, per_node)
            env = {
                **os.environ,
                "GLOO_SOCKET_IFNAME": topo.ns_if[node],
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(ROOT),
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(local),
                "LOCAL_WORLD_SIZE": str(per_node),
                "GROUP_RANK": str(node),
            }
            argv = [sys.executable, str(ROOT / "benchmarks" / "emulate.py"), "--node-worker"]
            argv += ["--store", f"{tmp}/store", "--result", f"{tmp}/r{rank}.json", "--model", model]
            argv += ["--hooks", ",".join(hooks), "--batch", str(args.batch), "--steps", str(args.steps)]
            argv += ["--warmup", str(args.warmup), "--size", args.size, "--nodes", str(nodes)]
            argv += ["--fsdp"] if args.fsdp else []
            procs.append(topo.run(node, argv, env))
        wait_all(procs, args.timeout, f"on {model}")
        return [json.loads(Path(f"{tmp}/r{r}.json").read_text()) for r in range(world)]


def summarize(model: str, results: list[dict], nodes: int, per_node: int) -> list[dict]:
    """One row per hook: step time and inter-node bytes per node per step, flat and node-aware."""

    def step_ms(mode: str, hook: str) -> float:
        return 1000 * max(_median(r[mode][hook]["times"]) for r in results)

    def per_node_mb(mode: str, hook: str, key: str) -> float | None:
        values = [r[mode][hook][key] for r in results]
        if any(v is None for v in values):
            return None
        return sum(values) / nodes / 2**20

    compute = step_ms("flat", "compute-only")
    rows = []
    for hook in [h for h in results[0]["flat"] if h != "compute-only"]:
        row = {
            "model": model,
            "hook": hook,
            "compute_ms": compute,
            "flat_ms": step_ms("flat", hook),
            "flat_link_mb": per_node_mb("flat", hook, "counted_bytes"),
            "flat_stats_mb": per_node_mb("flat", hook, "wire_bytes"),
        }
        if hook in results[0]["node"]:
            row["node_ms"] = step_ms("node", hook)
            row["node_link_mb"] = per_node_mb("node", hook, "counted_bytes")
            row["node_stats_mb"] = per_node_mb("node", hook, "wire_bytes")
            row["speedup"] = row["flat_ms"] / row["node_ms"]
            row["link_ratio"] = row["node_link_mb"] / row["flat_link_mb"] if row["flat_link_mb"] else None
        rows.append(row)
    return rows


def goals(rows: list[dict], rate: str, per_node: int) -> list[dict]:
    """The issue's goals, checked on the measured rows: (goal, hook, value, met)."""
    out = []
    for row in rows:
        hook = row["hook"]
        if "node_ms" not in row:
            continue
        ratio, speedup = row.get("link_ratio"), row["speedup"]
        if hook in BYTE_GOAL_HOOKS and ratio is not None:
            limit = BYTE_SLACK / per_node
            out.append(_goal(f"link bytes node/flat <= {limit:.2f}", hook, ratio, ratio <= limit))
        if hook in SPEED_GOAL_HOOKS and rate == "1gbit":
            out.append(_goal(f"speed-up >= {SPEEDUP_GOAL}", hook, speedup, speedup >= SPEEDUP_GOAL))
        out.append(_goal(f"node/flat step <= {SLOWDOWN_LIMIT}", hook, 1 / speedup, speedup >= 1 / SLOWDOWN_LIMIT))
    return out


def _goal(goal: str, hook: str, value: float, met: bool) -> dict:
    return {"goal": goal, "hook": hook, "value": value, "met": bool(met)}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


COLUMNS = [
    ("hook", "hook", ""),
    ("compute_ms", "compute ms", ".0f"),
    ("flat_ms", "flat ms", ".0f"),
    ("node_ms", "node ms", ".0f"),
    ("speedup", "flat/node", ".2f"),
    ("flat_link_mb", "flat link MB", ".2f"),
    ("node_link_mb", "node link MB", ".2f"),
    ("link_ratio", "node/flat bytes", ".3f"),
    ("flat_stats_mb", "flat stats MB", ".2f"),
    ("node_stats_mb", "node stats MB", ".2f"),
]
