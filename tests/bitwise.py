"""Reference worlds whose results are recorded bit for bit: every code path of the catalog
(``catalog.PATHS``), flat and node-aware (2 nodes of 2), trained a few steps on 4 ranks.

``python tests/bitwise.py`` records them for this torch, CPU and build into
``tests/fixtures/``; ``test_bitwise.py`` checks that the library still computes the same
bits. A refactor that should change nothing is checked against the record of the code before
it.
"""

import hashlib
import json
import platform
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import train_steps  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"
STEPS = 6
MODES = {"flat": None, "node": 2}


def key() -> str:
    """What the bits depend on besides the library: torch's version, the CPU (its model and
    the vector instructions torch uses; math libraries pick kernels by both) and whether the
    fused C loops are built."""
    from ddp_hooks._ext import cpu

    major, minor = torch.__version__.split(".")[:2]
    native = "native" if cpu.available() else "torch"
    return f"torch{major}.{minor}-{_cpu_model()}-{torch.backends.cpu.get_cpu_capability()}-{native}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1] for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return re.sub(r"[^A-Za-z0-9]+", "_", name.strip()).strip("_") or platform.machine()


def fixture() -> Path:
    return FIXTURES / f"bitwise-{key()}.json"


def make_ddp() -> tuple[nn.Module, DDP]:
    """The reference model (seeded) and its DDP wrapper with several buckets."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))
    return model, DDP(model, bucket_cap_mb=0.001)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _train(name: str, node_size: int | None, rank: int, world: int) -> dict:
    from ddp_hooks import catalog

    model, ddp = make_ddp()
    setup = catalog.PATHS[name].build(ddp, 0.1, node_size=node_size)
    g = torch.Generator().manual_seed(100 + rank)
    data = [(torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(STEPS)]
    train_steps(ddp, setup.optimizer, data)
    return {
        "params": hashlib.sha256(flat_params(model).numpy().tobytes()).hexdigest(),
        "sent_bytes": setup.state.stats()["total"]["sent_bytes"],
    }


def world(rank: int, size: int) -> dict:
    """Every path in both modes on this rank: ``{"<path>/<mode>": {params, sent_bytes}}``."""
    from ddp_hooks import catalog

    out = {}
    for name in catalog.PATHS:
        for mode, node_size in MODES.items():
            out[f"{name}/{mode}"] = _train(name, node_size, rank, size)
            dist.barrier()
    return out


def run() -> list[dict]:
    from ddp_hooks.testing import run_world

    return run_world(world, 4, timeout=600)


if __name__ == "__main__":
    FIXTURES.mkdir(exist_ok=True)
    fixture().write_text(json.dumps({"key": key(), "ranks": run()}, indent=1, sort_keys=True) + "\n")
    print(f"recorded {fixture()}")
