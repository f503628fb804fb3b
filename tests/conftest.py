import os

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import sys
from pathlib import Path

# the repository root, so that tests (and the ranks they spawn) can import benchmarks/
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402


def pytest_generate_tests(metafunc):
    """Tests marked ``device_branches`` run twice: with the CPU's host-flag branches, and with
    the sync-free branches written for GPUs (``DDP_HOOKS_SYNC_FREE=1`` in every rank)."""
    if metafunc.definition.get_closest_marker("device_branches"):
        metafunc.fixturenames.append("device_branch")
        metafunc.parametrize("device_branch", ["host-flags", "sync-free"], indirect=True)


@pytest.fixture
def device_branch(request, monkeypatch):
    if request.param == "sync-free":
        monkeypatch.setenv("DDP_HOOKS_SYNC_FREE", "1")
    return request.param
