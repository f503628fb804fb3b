"""The branches written for GPUs make no host read of a tensor, for every code path.

Every rank runs with ``sync_free`` on (CPU tensors take the GPU branches), the stand-in CUDA
extension installed (so the kernel dispatch path runs too) and the fused CPU loops off, and
trains each state of ``catalog.PATHS`` with the loop the GPU check runs
(:func:`benchmarks.sync_check.train`: synchronizations of the local-step algorithms, learning
rates that differ per parameter group and change every step, a step with an inf on one rank),
recording each host read of a tensor value that ddp_hooks code makes (:mod:`host_reads`). LAQ's
``wire="uploads"`` reads its upload flags on the host by design: the test checks that the
recorder sees those reads.
"""

from contextlib import contextmanager

import pytest
import torch

from benchmarks.sync_check import WARMUP, WATCHED, train
from ddp_hooks import catalog
from ddp_hooks.testing import run_world

# functions that read only host-side tensors by design: GRBS draws its selection on the CPU
HOST_SIDE = ("ddp_hooks/compress/grbs.py:", ("block_elements", "cuts"))


def _on_device(read: str) -> bool:
    where = read.split(" at ")[-1]
    return not (where.startswith(HOST_SIDE[0]) and where.split()[-1] in HOST_SIDE[1])


@contextmanager
def _device_reads():
    import host_reads

    with host_reads.recording() as reads:
        yield reads
        reads[:] = [r for r in reads if _on_device(r)]


def _world(rank, world, name, options=None):
    import cuda_standin

    from ddp_hooks._ext import cpu
    from ddp_hooks.compress import dispatch

    dispatch.install(cuda_standin, "cpu")
    with cpu.EXTENSION.disabled():
        return train(name, rank, world, torch.device("cpu"), _device_reads, options)


@pytest.mark.parametrize("name", sorted(set(catalog.PATHS) - set(catalog.HOST_READS_BY_DESIGN)))
def test_gpu_branches_make_no_host_read(name, monkeypatch):
    monkeypatch.setenv("DDP_HOOKS_SYNC_FREE", "1")
    for reads, steps in run_world(_world, 2, name):
        assert reads == [], f"{name} read tensors on the host in its GPU branches: {reads}"
        assert steps == WARMUP + WATCHED


@pytest.mark.parametrize("name", catalog.HOST_READS_BY_DESIGN)
def test_the_recorder_sees_the_reads_made_by_design(name, monkeypatch):
    monkeypatch.setenv("DDP_HOOKS_SYNC_FREE", "1")
    for reads, _ in run_world(_world, 2, name):
        assert reads and all("ddp_hooks/" in r for r in reads), reads


@pytest.mark.parametrize("name", ["ef-sgdm", "powersgd", "qsparse-signtopk", "laq-dense"])
def test_node_aware_gpu_branches_make_no_host_read(name, monkeypatch):
    """The node layer (intra-node exchanges, node flags, sharing after synchronizations) on 2
    nodes of 2 ranks."""
    monkeypatch.setenv("DDP_HOOKS_SYNC_FREE", "1")
    for reads, steps in run_world(_world, 4, name, {"node_size": 2}):
        assert reads == [], f"{name} (node-aware) read tensors on the host in its GPU branches: {reads}"
        assert steps == WARMUP + WATCHED
