"""Checkpoints written by an earlier version of the library, resumed by this one.

``python tests/old_checkpoints.py`` (run with the earlier version importable first, e.g.
``PYTHONPATH=<its checkout>``) trains every hook of the catalog 4 steps on 2 ranks, saves the
model, optimizer and hook state, trains 4 more steps and records each rank's checkpoint and
final parameters in ``tests/fixtures/`` (per torch version, CPU and build, as
``bitwise.py``). ``test_old_checkpoints.py`` loads each checkpoint into a fresh state of this
version and checks that the run ends on the recorded parameters, bit for bit.
"""

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bitwise import FIXTURES, flat_params, key, make_ddp  # noqa: E402

from models import train_steps  # noqa: E402

SPLIT, STEPS = 4, 8


def fixture() -> Path:
    return FIXTURES / f"checkpoints-{key()}.pt"


def _setup(name: str):
    from ddp_hooks import catalog

    model, ddp = make_ddp()
    return model, ddp, catalog.ENTRIES[name].build(ddp, 0.1)


def _train(ddp, setup, rank: int, steps: range) -> None:
    """Steps ``steps`` of this rank's data (step ``t`` drawn from its own seed)."""
    data = []
    for t in steps:
        g = torch.Generator().manual_seed(1000 * rank + t)
        data.append((torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)))
    train_steps(ddp, setup.optimizer, data)


def record(rank: int, world: int) -> dict:
    """Every hook: the checkpoint after SPLIT steps and the parameters after STEPS."""
    from ddp_hooks import catalog

    out = {}
    for name in catalog.ENTRIES:
        model, ddp, setup = _setup(name)
        _train(ddp, setup, rank, range(SPLIT))
        saved = copy.deepcopy(
            {"model": model.state_dict(), "optimizer": setup.optimizer.state_dict(), "hook": setup.state.state_dict()}
        )
        _train(ddp, setup, rank, range(SPLIT, STEPS))
        out[name] = {"saved": saved, "final": flat_params(model)}
    return out


def resume(rank: int, world: int, path: str) -> dict:
    """Every hook: this version loads the checkpoint recorded in ``path``, trains on; whether
    it ends on the recorded parameters, or the ValueError it raised."""
    out = {}
    for name, entry in torch.load(path, weights_only=False)["ranks"][rank].items():
        model, ddp, setup = _setup(name)
        try:
            model.load_state_dict(entry["saved"]["model"])
            setup.optimizer.load_state_dict(entry["saved"]["optimizer"])
            setup.state.load_state_dict(entry["saved"]["hook"])
        except ValueError as exc:
            out[name] = f"refused: {exc}"
            continue
        _train(ddp, setup, rank, range(SPLIT, STEPS))
        out[name] = "same" if torch.equal(flat_params(model), entry["final"]) else "differs"
    return out


if __name__ == "__main__":
    from ddp_hooks import __version__
    from ddp_hooks.testing import run_world

    FIXTURES.mkdir(exist_ok=True)
    torch.save({"version": __version__, "ranks": run_world(record, 2, timeout=600)}, fixture())
    print(f"recorded {fixture()} with ddp_hooks {__version__}")
