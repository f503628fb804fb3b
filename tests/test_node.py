"""Node-aware mode (``node_size``): 2 nodes x 2 ranks on gloo.

Every algorithm against its plain single-process reference (the one its own tests use) run on
the node means: worker i of the reference is node i, whose gradient is the mean of its ranks'
gradients. Parameters identical on all ranks for the replicated algorithms and on the ranks of
a node for all; memory only on the owners; intra- and inter-node bytes counted apart; bucket
rebuild (the reference worlds rebuild their tiny buckets after the first step), checkpoint and
resume, and the non-finite contract in node-aware mode; bad node sizes.
"""

import pytest
import test_cser
import test_ef_signsgdm
import test_laq
import test_powersgd
import test_qsparse
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_hooks as dh
from ddp_hooks import catalog
from ddp_hooks.core.node import assign
from ddp_hooks.testing import WorldError, run_world

from models import batches

NODES, L = 2, 2
WORLD = NODES * L


def _node_mean(per_rank, node):
    """The node layer's mean of per-rank tensors: the sum over the node's ranks, times 1/L."""
    total = per_rank[node * L]
    for r in range(node * L + 1, (node + 1) * L):
        total = total + per_rank[r]
    return total * (1.0 / L)


def _node_means(results, steps):
    """local[t][node][k] from each rank's recorded local gradients results[rank][0][t][k]."""
    params = len(results[0][0][0])
    return [
        [[_node_mean([results[r][0][t][k] for r in range(WORLD)], n) for k in range(params)] for n in range(NODES)]
        for t in range(steps)
    ]


def _assert_identical(tensors_per_rank, ranks):
    first = tensors_per_rank[ranks[0]]
    for r in ranks[1:]:
        assert all(torch.equal(a, b) for a, b in zip(first, tensors_per_rank[r])), f"rank {r} differs"


# ---------------------------------------------------------------- against the references
@pytest.mark.parametrize("topology", ["sharded", "allgather"])
def test_ef_sgdm_equals_the_reference_on_node_means(topology):
    steps = 12
    args = (steps, 0.9, True, topology, None, torch.float32, 0.0005, L)
    results = run_world(test_ef_signsgdm._reference_world, WORLD, *args)
    params = len(results[0][0][0])
    local = _node_means(results, steps)
    lrs = [test_ef_signsgdm._lr(t) for t in range(steps)]
    expected = test_ef_signsgdm.ef_sgdm_reference(local, lrs, [[list(range(params))]] * steps, 0.9, True, None)
    for t in range(steps):
        _assert_identical([results[r][1][t] for r in range(WORLD)], list(range(WORLD)))
        for got, want in zip(results[0][1][t], expected[t]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_powersgd_equals_the_reference_on_node_means():
    steps = 6
    results = run_world(test_powersgd._linearity_world, WORLD, steps, "gram_schmidt", torch.float32, L)
    q_init = {k: q for r in range(L) for k, q in results[r][2].items()}  # each owner drew its own
    assert len(q_init) == 4
    expected = test_powersgd.powersgd_reference(_node_means(results, steps), q_init, rank=2)
    for t in range(steps):
        _assert_identical([results[r][1][t] for r in range(WORLD)], list(range(WORLD)))
        for got, want in zip(results[0][1][t], expected[t]):  # one more averaging than flat: 2x atol
            torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("period", [1, 4])
def test_qsparse_equals_the_reference_on_node_means(period):
    steps, k = 12, 10
    results = run_world(test_qsparse._world, WORLD, steps, period, k, True, L)
    expected, _ = test_qsparse.qsparse_reference(NODES, steps, period, k, True, node_size=L)
    for rank in range(WORLD):
        for got, want in zip(results[rank][0], expected[rank // L]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    _assert_identical([results[r][0] for r in range(WORLD)], list(range(WORLD)))
    memory = [results[r][1] for r in range(WORLD)]  # memory only on the owners
    slot = "error" if period == 1 else "memory"
    for node in range(NODES):
        names = [set(memory[node * L + j][slot]) for j in range(L)]
        assert all(names) and not set.intersection(*names), names
        assert set.union(*names) == {n for n, _ in test_qsparse._Net().named_parameters()}


def _merged(logs):
    """The selections of all the local ranks of a node, step by step, then the step's reset."""
    steps = sorted({e[1] for log in logs for e in log})
    out = []
    for t in steps:
        out += [e for log in logs for e in log if e[0] == "grad" and e[1] == t]
        out += [e for e in logs[0] if e[0] == "reset" and e[1] == t]
    return out


def test_cser_equals_the_reference_on_node_means():
    steps = 10
    config = {"grad_ratio": 4, "model_ratio": 2, "period": 3, "block_size": 8, "node_size": L}
    results = run_world(test_cser._reference_world, WORLD, steps, config)
    log = _merged([results[r][1] for r in range(L)])
    expected = test_cser.cser_reference(NODES, steps, log, node_size=L)
    for rank in range(WORLD):
        got = torch.cat([p.reshape(-1) for p in results[rank][0]])
        torch.testing.assert_close(got, expected[rank // L], rtol=1e-5, atol=1e-6)
    for node in range(NODES):
        _assert_identical([results[r][0] for r in range(WORLD)], [node * L + j for j in range(L)])
    assert not torch.allclose(expected[0], expected[1])  # the nodes' models really bifurcate


@pytest.mark.parametrize("wire", ["dense", "uploads"])
def test_laq_equals_the_reference_on_node_means(wire):
    # 30 rounds: later, a code at a rounding boundary of the grid takes the other level under
    # the uploads wire's reconstruction (q_ref + code * unit - R, the reference's q_ref - R +
    # step * code), a one-level difference that the comparison would report
    iterations = 30
    results = run_world(test_laq._world, WORLD, iterations, {"bits": 4, "wire": wire, "node_size": L})
    theta, uploads = test_laq.laq_reference(NODES, iterations, node_size=L)
    for rank in range(WORLD):
        got = torch.cat([p.reshape(-1) for p in results[rank][0]])
        torch.testing.assert_close(got, theta, rtol=1e-4, atol=1e-5)
        assert results[rank][1] == uploads[rank // L]  # the node decides as one worker
        assert results[rank][2] == sum(uploads)
    _assert_identical([results[r][0] for r in range(WORLD)], list(range(WORLD)))
    assert sum(uploads) < 0.8 * NODES * iterations


def _baseline_world(rank, world, name, model_dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 5)).to(model_dtype)
    ddp = DDP(model, bucket_cap_mb=0.001)
    state = catalog.ENTRIES[name].state(node_size=L).register(ddp)
    local, outputs = [], []
    for x, y in batches(rank, 3):
        x = x.to(model_dtype)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        local.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        outputs.append([p.grad.clone() for p in model.parameters()])
    return local, outputs, state.stats()


@pytest.mark.parametrize("name,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_baselines_reduce_the_node_means(name, dtype):
    results = run_world(_baseline_world, WORLD, name)
    local = _node_means(results, 3)
    for t in range(3):
        _assert_identical([results[r][1][t] for r in range(WORLD)], list(range(WORLD)))
        for k, got in enumerate(results[0][1][t]):
            halves = [local[t][n][k].to(dtype).div_(NODES) for n in range(NODES)]
            want = (halves[0] + halves[1]).float()
            torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-7)
    stats = results[0][2]
    assert stats["node_size"] == L and stats["intra_node"]["total"]["sent_bytes"] > 0


def test_a_bf16_model_is_reduced_in_fp32_inside_the_node():
    """Gradient buckets of a bf16 model: the node mean is taken in fp32, then the algorithm (here
    fp32 all-reduce) runs on the bf16 share between the nodes."""
    results = run_world(_baseline_world, WORLD, "fp32", torch.bfloat16)
    for t in range(3):
        _assert_identical([results[r][1][t] for r in range(WORLD)], list(range(WORLD)))
        for k, got in enumerate(results[0][1][t]):
            assert got.dtype == torch.bfloat16
            halves = [
                _node_mean([results[r][0][t][k].float() for r in range(WORLD)], n).to(torch.bfloat16).mul_(0.5)
                for n in range(NODES)
            ]
            torch.testing.assert_close(got, halves[0] + halves[1], rtol=0, atol=0)


# ---------------------------------------------------------------- bytes, ownership, sizes
def _bytes_world(rank, world, name, node_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    ddp = DDP(model, bucket_cap_mb=0.01)
    setup = catalog.build(name, ddp, 0.05, node_size=node_size)
    for x, y in batches(rank, 8, features=32, classes=64):
        setup.optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        setup.optimizer.step()
    return setup.state.stats()


@pytest.mark.parametrize("name", ["ef-sgdm", "qsparse", "laq"])
def test_a_node_sends_one_share_of_the_flat_bytes(name):
    """What the ranks of a node hand to inter-node collectives together is about one flat
    rank's payload (its share of the tensors, plus per-tensor scales): 1/L of the node's flat
    bytes. (Bytes on the links are measured by benchmarks/emulate.py's shapers.)"""
    flat = run_world(_bytes_world, WORLD, name, None)
    node = run_world(_bytes_world, WORLD, name, L)
    flat_node = sum(flat[r]["total"]["sent_bytes"] for r in range(L))
    node_node = sum(node[r]["total"]["sent_bytes"] for r in range(L))
    assert node_node <= 1.15 * flat_node / L, (node_node, flat_node)
    assert all(s["intra_node"]["total"]["sent_bytes"] > 0 for s in node)
    assert all("intra_node" not in s for s in flat)


def test_ownership_is_balanced_whole_tensors_and_deterministic():
    numels = [4096, 64, 1536, 384, 64, 6, 4096]
    owners = assign(numels, 2)
    assert owners == assign(list(numels), 2)
    loads = [sum(n for n, o in zip(numels, owners) if o == j) for j in range(2)]
    assert max(loads) - min(loads) <= max(numels)
    assert sorted(set(assign([1, 1, 1], 3))) == [0, 1, 2]


def _bad_size_world(rank, world, node_size):
    model = nn.Linear(4, 4)
    ddp = DDP(model)
    try:
        dh.AllReduce(node_size=node_size).register(ddp)
    except ValueError as exc:
        return str(exc)
    return None


def test_node_sizes_are_checked():
    for bad in (0, -1, True, 2.0, "two"):
        with pytest.raises(ValueError, match="node_size"):
            dh.EFSignSGDM(node_size=bad)
    assert all("divide the world size 4" in m for m in run_world(_bad_size_world, WORLD, 3))
    assert all("LOCAL_WORLD_SIZE" in m for m in run_world(_bad_size_world, WORLD, "auto"))


def test_too_few_tensors_for_the_node_raise():
    with pytest.raises(WorldError, match="at least 2 parameter tensors"):
        run_world(_bad_tensors_world, WORLD)


def _bad_tensors_world(rank, world):
    ddp = DDP(nn.Linear(4, 4, bias=False))
    dh.AllReduce(node_size=L).register(ddp)


# ---------------------------------------------------------------- checkpoints, inf
@pytest.mark.parametrize("name", ["fp16", "ef-sgdm", "cser", "qsparse", "laq", "powersgd"])
def test_checkpoint_round_trip_and_resume_node_aware(name):
    import test_checkpoints

    for straight, resumed, round_trip in run_world(test_checkpoints._world, WORLD, name, 5, 9, L):
        assert round_trip
        assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


def _inf_world(rank, world, name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5))
    ddp = DDP(model, bucket_cap_mb=0.001)
    setup = catalog.build(name, ddp, 0.1, node_size=L)
    finite, bad, before, after = [], None, None, None
    for t, (x, y) in enumerate(batches(rank, 5)):
        if t == 2 and rank == 1:  # node 0, local rank 1: tanh saturates, so only 0.weight is inf
            x = x.clone()
            x[0, 0] = float("inf")
        memory = setup.state.state_dict()["memory"]
        setup.optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        finite.append(all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()))
        if t == 2:
            bad = sorted(n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all())
            before, after = memory, setup.state.state_dict()["memory"]
        if finite[-1]:  # what GradScaler does
            setup.optimizer.step()
    return finite, bad, before, after, setup.state.state_dict()["memory"]


@pytest.mark.parametrize("name", ["ef-sgdm", "powersgd", "qsparse", "laq"])
def test_an_inf_on_one_rank_reaches_every_node_and_spares_memory(name):
    """The bucket holding the inf is NaN on every rank of every node (so GradScaler skips the
    step everywhere), and no memory of its parameters takes the step in, on any rank."""
    results = run_world(_inf_world, WORLD, name)
    assert results[0][1], "the inf must reach some gradient"
    for finite, bad, before, after, last in results:
        assert finite == [True, True, False, True, True]
        assert bad == results[0][1]
        for slot, tensors in last.items():
            assert all(torch.isfinite(t).all() for t in tensors.values()), slot
        for slot in after:
            if slot == "q":  # the warm-start factor may move; it must stay finite
                continue
            assert all(torch.equal(before[slot][n], after[slot][n]) for n in bad if n in after[slot]), slot
