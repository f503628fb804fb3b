"""The world harness: results come back, failures surface instead of hanging."""

import os
import time

import pytest
import torch.distributed as dist

from ddp_hooks import testing
from ddp_hooks.testing import WorldError, run_world


def _ok(rank, world, base):
    return base + rank * 10 + world


def _raises(rank, world):
    if rank == 1:
        raise KeyError("boom on rank one")
    dist.barrier()
    return rank


def _dies(rank, world):
    if rank == 0:
        os._exit(3)
    dist.barrier()


def _dies_then_peer_fails(rank, world):
    # the peer's failure reaches the harness while it waits on the dead rank's message
    if rank == 0:
        os._exit(3)
    time.sleep(1.0)
    raise ConnectionError("peer went away")


def _hangs(rank, world):
    if rank == 1:
        time.sleep(60)
    return rank


def test_results_come_back_per_rank():
    assert run_world(_ok, 3, 5) == [8, 18, 28]


def test_exception_on_a_rank_is_raised_with_its_traceback():
    with pytest.raises(WorldError, match="boom on rank one"):
        run_world(_raises, 2, timeout=60)


def test_dead_rank_fails_fast():
    t0 = time.monotonic()
    with pytest.raises(WorldError, match="died"):
        run_world(_dies, 2, timeout=60)
    assert time.monotonic() - t0 < 50


def test_dead_rank_is_named_when_a_peer_fails_after_it():
    with pytest.raises(WorldError, match=r"(?s)rank 0 died \(exit code 3\).*rank 1 of 2 failed.*peer went away"):
        run_world(_dies_then_peer_fails, 2, timeout=60)


def test_hanging_world_times_out():
    with pytest.raises(WorldError, match="timed out") as caught:
        run_world(_hangs, 2, timeout=8)
    # and it says where each rank was
    assert "--- rank 1 at the deadline" in str(caught.value) and "_hangs" in str(caught.value)


def test_a_world_whose_rendezvous_fails_is_started_again(monkeypatch):
    # gloo's full-mesh connect on loopback sometimes loses a connection while other worlds
    # connect at the same time; only that start-up failure is retried, with a fresh world
    monkeypatch.setattr(testing, "_FAILED_STARTS_TO_SIMULATE", [2])
    assert run_world(_ok, 2, 1) == [3, 13]
    monkeypatch.setattr(testing, "_FAILED_STARTS_TO_SIMULATE", [3])
    with pytest.raises(WorldError, match="(?s)could not start.*simulated"):
        run_world(_ok, 2, 1)
