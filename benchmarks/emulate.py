"""Step times under real bandwidth limits on one machine.

Every worker runs in its own network namespace, joined to a bridge by a veth link; with a rate
(e.g. 100mbit, 1gbit, 10gbit) both directions of every link are shaped with tc (a token
bucket at the rate; with --delay-ms also a netem delay), as if each worker had a NIC of that
speed. With ``--link shared`` the workers instead share one link of that rate (a hub, or one
uplink for all of them): everything any worker sends is redirected through a single shaped
ifb device. The workers run the step-time
measurement of ``benchmarks/step_time.py`` over gloo; before that the script measures the TCP
throughput actually achieved between two namespaces and prints it. Everything it creates
(namespaces, links, bridge, qdiscs) is torn down when it ends, also on errors or Ctrl-C. It
needs root (network namespaces and tc) and says so otherwise.

    sudo python benchmarks/emulate.py --workers 4 --rates 100mbit,1gbit,unshaped --models resnet18

With ``--nodes N --workers-per-node L`` each namespace is a node of L workers instead (they talk
over the node's loopback, unshaped; the links join the nodes), and every hook runs flat and
node-aware side by side, its inter-node bytes per node counted by the node's shaper (see
``benchmarks/nodes.py``):

    sudo python benchmarks/emulate.py --nodes 2 --workers-per-node 2 --rates 1gbit,100mbit --size cifar

With ``--fsdp`` as well, the model is sharded with FSDP2 inside each node and replicated
between nodes (HSDP): native HSDP runs beside every hook registered with ``register_fsdp``,
each hook's step time and link bytes per node reported as ratios to native HSDP's
(``benchmarks/fsdp.py``):

    sudo python benchmarks/emulate.py --nodes 2 --workers-per-node 2 --fsdp --rates 100mbit --steps 8 --warmup 4
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class Topology:
    """``n`` namespaces on one bridge, optionally shaped; a context manager that cleans up."""

    def __init__(self, n: int, rate: str | None, delay_ms: float = 0.0, shared: bool = False) -> None:
        self.tag = tag = tag_of(os.getpid())
        self.n, self.rate, self.delay_ms, self.shared = n, rate, delay_ms, shared
        self.bridge = f"{tag}br"
        self.ifb = f"{tag}ifb"
        self.ns = [f"{tag}n{i}" for i in range(n)]
        self.host_if = [f"{tag}h{i}" for i in range(n)]
        self.ns_if = [f"{tag}v{i}" for i in range(n)]
        self.subnet = 10 + os.getpid() % 200
        self.ips = [f"10.77.{self.subnet}.{i + 1}" for i in range(n)]
        self._made: list[list[str]] = []

    def _ip(self, *args: str, undo: list[str] | None = None) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)
        if undo:
            self._made.append(undo)

    def __enter__(self) -> "Topology":
        try:
            self._ip("link", "add", self.bridge, "type", "bridge", undo=["link", "del", self.bridge])
            self._ip("link", "set", self.bridge, "up")
            shared = self.shared and (self.rate or self.delay_ms)
            if shared:  # one shaped device that every worker's traffic passes through
                self._ip("link", "add", self.ifb, "type", "ifb", undo=["link", "del", self.ifb])
                self._ip("link", "set", self.ifb, "up")
                self._shape([], self.ifb)
            for i in range(self.n):
                ns, host, inner = self.ns[i], self.host_if[i], self.ns_if[i]
                self._ip("netns", "add", ns, undo=["netns", "del", ns])
                self._ip("link", "add", host, "type", "veth", "peer", "name", inner, undo=["link", "del", host])
                self._ip("link", "set", inner, "netns", ns)
                self._ip("link", "set", host, "master", self.bridge)
                self._ip("link", "set", host, "up")
                self._ip("-n", ns, "addr", "add", f"{self.ips[i]}/24", "dev", inner)
                self._ip("-n", ns, "link", "set", inner, "up")
                self._ip("-n", ns, "link", "set", "lo", "up")
                if shared:  # what worker i sends enters the bridge here: through the ifb first
                    _tc("qdisc", "add", "dev", host, "clsact")
                    _tc(
                        "filter",
                        "add",
                        "dev",
                        host,
                        "ingress",
                        "protocol",
                        "all",
                        "prio",
                        "1",
                        "u32",
                        "match",
                        "u32",
                        "0",
                        "0",
                        "action",
                        "mirred",
                        "egress",
                        "redirect",
                        "dev",
                        self.ifb,
                    )
                    continue
                for prefix, dev in ((["-n", ns], inner), ([], host)):  # both directions
                    self._shape(prefix, dev)
        except BaseException:
            self.close()
            raise
        return self

    def _shape(self, prefix: list[str], dev: str) -> None:
        """Token bucket at the rate (a burst of at least 4 ms of traffic, and of 64 KB GSO
        packets), and a netem delay below it when one is asked for."""
        parent = ["root"]
        if self.delay_ms:
            _tc(*prefix, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay", f"{self.delay_ms}ms")
            parent = ["parent", "1:1"]
        if self.rate:
            burst = max(256 * 1024, int(rate_bits(self.rate) / 8 / 250))
            _tc(
                *prefix,
                "qdisc",
                "add",
                "dev",
                dev,
                *parent,
                "tbf",
                "rate",
                self.rate,
                "burst",
                str(burst),
                "latency",
                "200ms",
            )

    def close(self) -> None:
        for undo in reversed(self._made):
            subprocess.run(["ip", *undo], capture_output=True)
        self._made = []

    def __exit__(self, *exc) -> None:
        self.close()

    def shaped_bytes(self) -> dict[str, int]:
        """Bytes each shaping device has sent so far (from ``tc -s``): the ifb of a shared link,
        or both ends of every worker's veth (``"v<i>"`` inside namespace i, ``"h<i>"`` outside)."""
        if self.shared and (self.rate or self.delay_ms):
            devices = {"ifb": ([], self.ifb)}
        else:
            devices = {}
            for i in range(self.n):
                devices[f"v{i}"] = (["-n", self.ns[i]], self.ns_if[i])
                devices[f"h{i}"] = ([], self.host_if[i])
        out = {}
        for name, (prefix, dev) in devices.items():
            text = subprocess.run(
                ["tc", *prefix, "-s", "qdisc", "show", "dev", dev, "root"], capture_output=True, text=True, check=True
            ).stdout
            sent = re.search(r"Sent (\d+) bytes", text)
            out[name] = int(sent.group(1)) if sent else 0
        return out

    def run(self, i: int, argv: list[str], env: dict, **popen) -> subprocess.Popen:
        """Start ``argv`` inside namespace ``i`` (``popen``: more arguments of Popen)."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns[i], *argv], env=env, **popen)


def tag_of(pid: int) -> str:
    """The prefix of every name a process's topology creates (namespaces, links, bridge)."""
    return f"dh{pid % 100000}"


def _tc(*args: str) -> None:
    done = subprocess.run(["tc", *args], capture_output=True, text=True)
    if done.returncode != 0:
        hint = " (this kernel lacks the netem qdisc: --delay-ms needs it)" if "netem" in args else ""
        if "mirred" in args or "clsact" in args:
            hint = " (--link shared needs the ifb device, the clsact qdisc, u32 and mirred)"
        raise RuntimeError(f"tc {' '.join(args)} failed: {done.stderr.strip()}{hint}")


def rate_bits(rate: str) -> float:
    """'100mbit' -> 1e8 bits per second."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12, "bit": 1.0}
    for unit, scale in units.items():
        if rate.lower().endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise ValueError(f"rate must look like 100mbit or 1gbit, got {rate!r}")


def check_privileges() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "emulate.py needs root: it creates network namespaces and shapes links with tc (run it with sudo)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"emulate.py needs the '{tool}' command (Debian/Ubuntu: apt-get install iproute2)"
    probe = f"dhprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def measure_throughput(topo: Topology, megabytes: int = 8) -> float:
    """TCP throughput (bits/s) from namespace 0 to namespace 1, measured with a plain socket."""
    return measure_flows(topo, [(0, 1)], megabytes)[0]


def measure_flows(topo: Topology, pairs: list[tuple[int, int]], megabytes: int = 8) -> list[float]:
    """TCP throughput (bits/s) of each flow ``(src, dst)`` between namespaces, all at once."""
    servers, clients = [], []
    for k, (src, dst) in enumerate(pairs):
        port = 29400 + (os.getpid() + k) % 1000
        server = (
            "import socket,sys,time\n"
            f"s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('{topo.ips[dst]}',{port}));s.listen(1)\n"
            "c,_=s.accept();n=0;t=None\n"
            "while True:\n"
            " b=c.recv(1<<20)\n"
            " if not b: break\n"
            " t=t or time.perf_counter();n+=len(b)\n"
            "print(n*8/(time.perf_counter()-t))\n"
        )
        servers.append(
            subprocess.Popen(
                ["ip", "netns", "exec", topo.ns[dst], sys.executable, "-c", server], stdout=subprocess.PIPE, text=True
            )
        )
        client = (
            "import socket,time\n"
            "for _ in range(50):\n"
            " try:\n"
            f"  c=socket.create_connection(('{topo.ips[dst]}',{port}));break\n"
            " except OSError: time.sleep(0.1)\n"
            f"buf=b'x'*(1<<20)\nfor _ in range({megabytes}): c.sendall(buf)\nc.close()\n"
        )
        clients.append(subprocess.Popen(["ip", "netns", "exec", topo.ns[src], sys.executable, "-c", client]))
    for c in clients:
        if c.wait(timeout=300):
            raise RuntimeError("a throughput probe failed")
    return [float(srv.communicate(timeout=300)[0].strip()) for srv in servers]


def _worker(args) -> None:
    """One rank inside its namespace: the step-time measurement, result to a JSON file."""
    import torch.distributed as dist

    from benchmarks import nodes, step_time

    dist.init_process_group("gloo", store=dist.FileStore(args.store, args.world), rank=args.rank, world_size=args.world)
    names = args.hooks.split(",")
    iface = os.environ["GLOO_SOCKET_IFNAME"]  # this worker's own link: the kernel's (or shaper's) counter
    result = step_time._measure(
        args.rank,
        args.world,
        args.model,
        names,
        args.batch,
        args.steps,
        args.warmup,
        args.size,
        0.01,
        counter=lambda: nodes.link_bytes(iface),
    )
    Path(args.result).write_text(json.dumps(result))
    dist.barrier()  # no rank tears its connections down while another still reads from them
    dist.destroy_process_group()


def run_rate(rate: str, args, hooks: list[str]) -> dict:
    shaped = None if rate == "unshaped" else rate
    shared = args.link == "shared"
    with Topology(args.workers, shaped, args.delay_ms, shared) as topo:
        achieved = measure_throughput(topo, megabytes=4 if shaped and "m" in shaped.lower() else 32)
        print(f"  {rate}: measured TCP throughput {achieved / 1e6:,.0f} Mb/s between two workers", flush=True)
        rows = []
        from benchmarks import common, step_time

        for model in args.models.split(","):
            with tempfile.TemporaryDirectory(prefix="ddph_emulate_") as tmp:
                procs = []
                for i in range(args.workers):
                    env = {
                        **os.environ,
                        "GLOO_SOCKET_IFNAME": topo.ns_if[i],
                        "OMP_NUM_THREADS": "1",
                        "PYTHONPATH": str(ROOT),
                    }
                    argv = [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "--worker",
                        "--rank",
                        str(i),
                        "--world",
                        str(args.workers),
                        "--store",
                        f"{tmp}/store",
                        "--result",
                        f"{tmp}/r{i}.json",
                        "--model",
                        model,
                        "--hooks",
                        ",".join(hooks),
                        "--batch",
                        str(args.batch),
                        "--steps",
                        str(args.steps),
                        "--warmup",
                        str(args.warmup),
                        "--size",
                        args.size,
                    ]
                    procs.append(topo.run(i, argv, env))
                common.wait_all(procs, args.timeout, f"at {rate}")
                results = [json.loads(Path(f"{tmp}/r{i}.json").read_text()) for i in range(args.workers)]
            # a shared link carries every worker's bytes: each gets 1/n of it when all send
            per_worker = achieved / args.workers if shared and shaped else achieved
            for row in step_time.summarize(model, results):
                wire_s = row["wire_mb"] * 2**20 * 8 / per_worker
                row["floor_ms"] = row["compute_ms"] + 1000 * wire_s
                row["vs_floor"] = row["step_ms"] / row["floor_ms"]
                rows.append(row)
    return {
        "rate": rate,
        "link": args.link,
        "delay_ms": args.delay_ms,
        "measured_rate": f"{achieved:.0f}",
        "world_size": args.workers,
        "size": args.size,
        "rows": rows,
    }


def run_nodes(rate: str, args, hooks: list[str]) -> dict:
    """``args.nodes`` namespaces of ``args.workers_per_node`` workers: flat vs node-aware, or
    with ``--fsdp`` native HSDP vs every hook on a sharded model (a replica per node)."""
    from benchmarks import fsdp, nodes

    shaped = None if rate == "unshaped" else rate
    with Topology(args.nodes, shaped, args.delay_ms, args.link == "shared") as topo:
        achieved = measure_throughput(topo, megabytes=4 if shaped and "m" in shaped.lower() else 32)
        print(f"  {rate}: measured TCP throughput {achieved / 1e6:,.0f} Mb/s between two nodes", flush=True)
        rows = []
        for model in args.models.split(","):
            results = nodes.launch(topo, args, model, hooks)
            if args.fsdp:
                rows += fsdp.summarize(model, results, args.nodes)
            else:
                rows += nodes.summarize(model, results, args.nodes, args.workers_per_node)
    return {
        "rate": rate,
        "link": args.link,
        "delay_ms": args.delay_ms,
        "measured_rate": f"{achieved:.0f}",
        "nodes": args.nodes,
        "workers_per_node": args.workers_per_node,
        "size": args.size,
        "batch": args.batch,
        "steps": args.steps,
        "rows": rows,
        "fsdp": args.fsdp,
        "goals": fsdp.goals(rows, rate) if args.fsdp else nodes.goals(rows, rate, args.workers_per_node),
    }


def _report_nodes(result: dict, args) -> None:
    from benchmarks import fsdp, nodes
    from benchmarks.common import table

    print(table(result["rows"], fsdp.COLUMNS if args.fsdp else nodes.COLUMNS))
    print("MB: per node per step; link = the node's shaper counter, stats = the library's own count")
    for g in result["goals"]:
        print(f"  {'met ' if g['met'] else 'MISS'} {g['hook']:>8}: {g['goal']} (measured {g['value']:.3f})")


def main(argv=None) -> list[dict]:
    from benchmarks import step_time
    from benchmarks.common import comma_choices, listing, table, write_json
    from benchmarks.models import NAMES as MODEL_NAMES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rates", default="100mbit,1gbit,unshaped", help="comma-separated; 'unshaped' = no tc")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added to every link")
    parser.add_argument(
        "--link",
        default="per-worker",
        choices=["per-worker", "shared"],
        help="each worker its own link of the rate, or all of them one link of the rate",
    )
    parser.add_argument("--models", default="resnet18", help=listing(MODEL_NAMES))
    parser.add_argument("--size", default="cifar", choices=["full", "cifar", "tiny"])
    parser.add_argument("--hooks", default=",".join(step_time.hooks()), help=listing(step_time.hooks()))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per rate and model")
    parser.add_argument("--out", default=None)
    parser.add_argument("--nodes", type=int, default=0, help="emulate this many nodes (each a namespace)")
    parser.add_argument("--workers-per-node", type=int, default=2, help="workers inside each node (with --nodes)")
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="with --nodes: an FSDP2 model sharded inside each node, native HSDP beside every hook (register_fsdp)",
    )
    # internal: one worker inside its namespace
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--node-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return []
    if args.node_worker:
        from benchmarks import nodes

        nodes.worker(args)
        return []
    hooks = comma_choices(parser, "--hooks", args.hooks, step_time.hooks())
    args.models = ",".join(comma_choices(parser, "--models", args.models, MODEL_NAMES))
    if args.nodes and (args.nodes < 2 or args.workers_per_node < 1):
        parser.error("--nodes must be at least 2 and --workers-per-node at least 1")
    why = check_privileges()
    if why:
        print(why, file=sys.stderr)
        raise SystemExit(2)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    out = []
    for rate in [r.strip() for r in args.rates.split(",") if r.strip()]:
        if args.nodes:
            print(f"{rate}: {args.nodes} nodes x {args.workers_per_node} workers, {args.models} ...", flush=True)
            result = run_nodes(rate, args, hooks)
            _report_nodes(result, args)
            name = f"emulate_{'fsdp' if args.fsdp else 'nodes'}{args.nodes}x{args.workers_per_node}_{rate}"
            path = write_json(name + ("_shared" if args.link == "shared" else ""), result, args.out)
            print(f"wrote {path}\n")
            out.append(result)
            continue
        print(f"{rate}: {args.workers} workers, {args.models}, {len(hooks)} hooks ...", flush=True)
        result = run_rate(rate, args, hooks)
        print(
            table(
                result["rows"], step_time.COLUMNS + [("floor_ms", "floor ms", ".1f"), ("vs_floor", "step/floor", ".2f")]
            )
        )
        if "torch-bf16" not in hooks:
            print("(torch's bf16_compress_hook needs CUDA and NCCL: torch-bf16/hook compares with ddp_hooks' bf16)")
        path = write_json(f"emulate_{rate}" + ("_shared" if args.link == "shared" else ""), result, args.out)
        print(f"wrote {path}\n")
        out.append(result)
    return out


if __name__ == "__main__":
    main()
