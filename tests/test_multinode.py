"""Two emulated nodes, for real: each node a network namespace joined to the other by a veth
link, torchrun in each with c10d rendezvous (2 ranks per node, gloo over the node's interface),
every algorithm trained flat and node-aware (``node_size="auto"``). Needs root and iproute2;
skips with the reason where namespaces cannot be made."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.emulate import Topology, check_privileges
from ddp_hooks import catalog
from ddp_hooks.core import fsdp

CLIENTS = Path(__file__).resolve().parent / "clients"
HOOKS = list(catalog.ENTRIES)
REPLICATED = {"fp32", "fp16", "bf16", "ef-sgdm", "powersgd", "laq"}  # one model on every rank
GATHERED = {"ef-sgdm", "qsparse", "laq"}  # inter-node bytes per node drop to about 1/L
PER_NODE = 2
FSDP2 = fsdp.torch_version() >= fsdp.MIN_TORCH  # FSDP2's all-reduce hook


def _torchrun(topo: Topology, node: int, out: Path, log) -> subprocess.Popen:
    env = dict(os.environ, GLOO_SOCKET_IFNAME=topo.ns_if[node], OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(CLIENTS), env.get("PYTHONPATH", "")])
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", str(PER_NODE)]
    argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{topo.ips[0]}:29531", "--rdzv-id", "ddph-nodes"]
    # the store's host is node 0: torchrun cannot tell from a namespace's address that it is its own
    argv += ["--rdzv-conf", f"is_host={int(node == 0)}"]
    argv += ["--local-addr", topo.ips[node], "nodes_run.py", "--hooks", ",".join(HOOKS), "--out", str(out)]
    argv += ["--fsdp"] if FSDP2 else []
    return topo.run(node, argv, env, cwd=CLIENTS, stdout=log, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def _hostname_is_node_zero(topo: Topology):
    """Inside every node, this machine's host name resolves to node 0's address: torchrun before
    torch 2.5 hands its workers the rendezvous host's name (not its address) as MASTER_ADDR.
    ``ip netns exec`` reads a namespace's /etc/netns/<name>/hosts in place of /etc/hosts."""
    made = []
    try:
        for ns in topo.ns:
            folder = Path("/etc/netns") / ns
            folder.mkdir(parents=True, exist_ok=True)
            made.append(folder)
            name = socket.gethostname()
            (folder / "hosts").write_text(f"127.0.0.1 localhost\n{topo.ips[0]} {name}\n")
        yield
    finally:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    why = check_privileges()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("nodes")
    with Topology(2, None) as topo, _hostname_is_node_zero(topo):
        logs = [open(out / f"node{i}.log", "w") for i in range(2)]
        procs = [_torchrun(topo, i, out, logs[i]) for i in range(2)]
        try:
            codes = [p.wait(timeout=300) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for f in logs:
                f.close()
    text = "\n".join((out / f"node{i}.log").read_text()[-4000:] for i in range(2))
    assert codes == [0, 0], text
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2 * PER_NODE)]


def _same(a: list[float], b: list[float]) -> bool:
    return a == b


def test_torchrun_numbers_the_ranks_by_node(ranks):
    for r, result in enumerate(ranks):
        assert result["world"] == 4 and result["LOCAL_WORLD_SIZE"] == PER_NODE
        assert r == result["GROUP_RANK"] * PER_NODE + result["LOCAL_RANK"]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_algorithm_flat_and_node_aware_across_two_nodes(ranks, hook):
    for mode in ("flat", "node"):
        runs = [r["runs"][f"{hook}/{mode}"] for r in ranks]
        for run in runs:
            assert run["accuracy"] > 0.8, (mode, run["accuracy"])
        if mode == "node":
            assert all(run["node_size"] == PER_NODE and run["intra_bytes"] > 0 for run in runs)
            # a node is one worker: its ranks hold one model after every step
            for node in range(2):
                first, second = runs[node * PER_NODE], runs[node * PER_NODE + 1]
                assert _same(first["params"], second["params"]), hook
        else:
            assert all(run["node_size"] is None and run["intra_bytes"] == 0 for run in runs)
        if hook in REPLICATED:
            assert all(_same(run["params"], runs[0]["params"]) for run in runs), (hook, mode)


@pytest.mark.skipif(not FSDP2, reason="FSDP2's all-reduce hook needs torch 2.7")
@pytest.mark.parametrize("hook", HOOKS)
def test_every_algorithm_under_fully_shard_across_two_nodes(ranks, hook):
    """HSDP: sharded inside each node, the algorithm between the nodes (register_fsdp)."""
    runs = [r["runs"][f"{hook}/fsdp"] for r in ranks]
    for run in runs:
        assert run["accuracy"] > 0.8, run["accuracy"]
        assert run["wire_bytes"] > 0 and run["steps"] == runs[0]["steps"] > 0
    for node in range(2):  # the ranks of a node hold one replica
        assert _same(runs[node * PER_NODE]["params"], runs[node * PER_NODE + 1]["params"]), hook
    if hook in REPLICATED:  # and the replicas agree
        assert _same(runs[0]["params"], runs[PER_NODE]["params"]), hook


@pytest.mark.parametrize("hook", sorted(GATHERED))
def test_node_aware_sends_fewer_bytes_between_nodes(ranks, hook):
    flat = sum(r["runs"][f"{hook}/flat"]["wire_bytes"] for r in ranks)
    node = sum(r["runs"][f"{hook}/node"]["wire_bytes"] for r in ranks)
    assert node <= 0.55 * flat, (hook, node / flat)
