"""A hook checkpoint written by the earlier version recorded in ``tests/fixtures/`` loads into
this version and the run ends on the same parameters, bit for bit (see
``tests/old_checkpoints.py``)."""

import old_checkpoints
import pytest
import torch

from ddp_hooks import catalog
from ddp_hooks.testing import run_world


def test_checkpoints_of_the_recorded_version_resume_bit_exactly():
    path = old_checkpoints.fixture()
    if not path.exists():
        pytest.skip(f"no recorded checkpoints for {old_checkpoints.key()} (python tests/old_checkpoints.py)")
    recorded = torch.load(path, weights_only=False)
    results = run_world(old_checkpoints.resume, 2, str(path))
    # every hook of the recorded version is still here (hooks added since have no record)
    assert set(results[0]) == set(recorded["ranks"][0]) <= set(catalog.ENTRIES)
    assert len(results[0]) >= 8
    for rank, by_hook in enumerate(results):
        for name, verdict in by_hook.items():
            assert verdict == "same", (recorded["version"], name, rank, verdict)
