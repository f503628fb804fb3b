"""Transports deliver what a plain reference computes, count exact bytes, and keep order
with many buckets in flight."""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_hooks.comm import Transport
from ddp_hooks.core import HookState
from ddp_hooks.core.stats import Stats
from ddp_hooks.testing import run_world


def _collectives_world(rank, world):
    stats = Stats(world)
    tr = Transport(dist.group.WORLD, stats, stages=2)
    x = torch.arange(10, dtype=torch.float32) * (rank + 1)
    summed = tr.all_reduce(x.clone(), step=0).wait()
    payload = torch.full((7,), rank, dtype=torch.uint8)
    gathered = tr.all_gather(payload, step=0).wait()
    chunks = torch.stack([torch.full((3,), 10 * rank + j, dtype=torch.int32) for j in range(world)])
    received = tr.all_to_all(chunks, step=1).wait()

    # the owner of shard `rank` sums what it received, then all shards are gathered
    replies = tr.through_owners(chunks, lambda rows: rows.sum(0).to(torch.int32), step=1).wait()
    return summed, gathered, received, replies, stats.summary(2)


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_match_reference_and_count_bytes(world):
    for rank, (summed, gathered, received, replies, stats) in enumerate(run_world(_collectives_world, world)):
        n = world
        assert torch.equal(summed, torch.arange(10.0) * sum(range(1, n + 1)))
        assert torch.equal(gathered, torch.arange(n, dtype=torch.uint8)[:, None].expand(n, 7))
        assert torch.equal(received, torch.tensor([[10 * i + rank] * 3 for i in range(n)], dtype=torch.int32))
        for j in range(n):
            assert torch.equal(replies[j], torch.full((3,), sum(10 * i + j for i in range(n)), dtype=torch.int32))
        total = stats["total"]
        # 40 B all-reduce + 7 B all-gather + 2 x (n*3*4 B all-to-all) + 12 B all-gather
        assert total["sent_bytes"] == 40 + 7 + 2 * 12 * n + 12
        assert total["received_bytes"] == 40 + 7 * n + 2 * 12 * n + 12 * n
        wire = 40 * 2 * (n - 1) / n + 7 * (n - 1) + 2 * 12 * n * (n - 1) / n + 12 * (n - 1)
        assert total["wire_bytes"] == pytest.approx(wire)


def _uneven_owners_world(rank, world):
    """Owner ``j`` of ``j + 1`` elements: every rank sends it ``(rank + 1) (j + 1)`` there; it
    serves in the hook, through a collective of its own (the node carrier's shape)."""
    from ddp_hooks.comm import chain

    tr = Transport(dist.group.WORLD, Stats(world), stages=2)
    sizes = [j + 1 for j in range(world)]
    send = torch.cat([torch.full((n,), float((rank + 1) * n)) for n in sizes])
    mine = sizes[rank]
    splits = ((sizes, [mine] * world), ([mine] * world, sizes))

    def serve(received):
        total = received.view(world, mine).sum(0)
        return chain(tr.all_reduce(torch.ones(1), step=0), lambda ones: total * ones)

    return tr.through_owners(send, serve, 0, splits, in_hook=True).wait()


@pytest.mark.parametrize("world", [2, 4])
def test_through_owners_with_uneven_shares_served_in_the_hook(world):
    n = world
    expected = torch.cat([torch.full((j + 1,), float(n * (j + 1) * n * (n + 1) // 2)) for j in range(n)])
    for got in run_world(_uneven_owners_world, world):
        assert torch.equal(got, expected)


class _ShardedMean(HookState):
    """A two-stage test hook: exact mean through the sharded exchange (all-to-all + all-gather)."""

    stages = 2

    def __init__(self):
        super().__init__()
        self.numels = []

    def reduce(self, bucket, step):
        buf = bucket.buffer
        n = self.world_size
        shard = -(-buf.numel() // n)
        self.numels.append((step, buf.numel()))
        chunks = torch.zeros(n * shard)
        chunks[: buf.numel()] = buf
        received = self.transport.all_to_all(chunks.view(n, shard), step)
        fut = self.transport.then(received, 1, lambda rows: self.transport.all_gather(rows.sum(0) / n, step, stage=1))

        def unpack(f):
            buf.copy_(f.value().reshape(-1)[: buf.numel()])
            return buf

        return fut.then(unpack)


def _many_buckets_world(rank, world, width, depth):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    ddp = DDP(model, bucket_cap_mb=0.5)
    state = _ShardedMean()
    ddp.register_comm_hook(state, __import__("ddp_hooks").comm_hook)
    g = torch.Generator().manual_seed(rank)
    local, reduced = [], []
    for _ in range(2):
        x = torch.randn(4, width, generator=g)
        model.zero_grad()
        model(x).square().mean().backward()  # local gradient, no DDP
        local.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
        ddp(x).square().mean().backward()
        reduced.append([p.grad.clone() for p in model.parameters()])
    return local, reduced, state.numels, state.stats()


def test_many_buckets_in_flight_two_stage_exchange():
    world, width, depth = 4, 512, 40  # 10.5M parameters, ~40 buckets after the rebuild
    results = run_world(_many_buckets_world, world, width, depth, timeout=400)
    numels = [n for _, n in results[0][2]]
    assert sum(step == 1 for step, _ in results[0][2]) >= 30, "needs many buckets in flight"
    for step in range(2):
        mean = [sum(r[0][step][i] for r in results) / world for i in range(2 * depth)]
        for _, reduced, _, _ in results:
            for m, g in zip(mean, reduced[step]):
                torch.testing.assert_close(g, m, rtol=1e-5, atol=1e-7)
        for other in results[1:]:  # ranks hold identical gradients
            assert all(torch.equal(a, b) for a, b in zip(results[0][1][step], other[1][step]))
    total = results[0][3]["total"]
    shards = [-(-n // world) for n in numels]
    assert total["sent_bytes"] == sum(4 * world * s + 4 * s for s in shards)
    assert total["received_bytes"] == sum(4 * world * s + 4 * world * s for s in shards)
