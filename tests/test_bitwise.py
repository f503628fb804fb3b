"""The library computes the same bits as the code the record was made from (see
``tests/bitwise.py``): every code path, flat and node-aware, every rank's parameters and bytes."""

import json

import bitwise
import pytest


def test_every_path_computes_the_recorded_bits():
    path = bitwise.fixture()
    if not path.exists():
        pytest.skip(f"no record for {bitwise.key()} (python tests/bitwise.py records one)")
    recorded = json.loads(path.read_text())["ranks"]
    now = bitwise.run()
    differ = sorted(
        f"{run} on rank {rank}"
        for rank, (old, new) in enumerate(zip(recorded, now))
        for run in old
        if old[run] != new.get(run)
    )
    assert set(recorded[0]) == set(now[0])
    assert not differ, f"results differ from the record: {differ}"
