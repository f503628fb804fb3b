"""FSDP2/HSDP models for the benchmarks: native HSDP beside every hook of the catalog through
``register_fsdp``, on a 2-D mesh (replicas x shards).

The model's blocks (each transformer layer, else each top-level child that holds parameters)
and the root are sharded with ``fully_shard``: over the 2-D mesh for native HSDP (FSDP
all-reduces every gradient shard between the replicas itself), over ``mesh["shard"]`` for the
hooks (the state runs the algorithm between the replicas). ``emulate.py --nodes N --fsdp`` runs
it with one replica per emulated node.
"""

import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from benchmarks import launch
from benchmarks.models import build as build_model
from ddp_hooks import catalog

NATIVE = "native-hsdp"


def mesh_of(replicas: int, world: int, device: torch.device) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    if world % replicas:
        raise ValueError(f"the world size {world} is not a multiple of the replicas {replicas}")
    return init_device_mesh(device.type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))


def shard(model: nn.Module, mesh: Any) -> nn.Module:
    """``fully_shard`` on the model's blocks, then on the root."""
    from torch.distributed.fsdp import fully_shard

    blocks = [m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)]
    if not blocks:
        blocks = [c for c in model.children() if any(True for _ in c.parameters())]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple, dev: torch.device) -> float:
    x, y, loss_fn = batch
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss_fn(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(rank: int, world: int, model_name: str, names: list[str], setting: dict, counter: Any = None) -> dict:
    """Per hook (and native HSDP first): the timed steps' times, the library's wire bytes per
    step and, with ``counter`` (read after a barrier before and after the timed steps), the
    counter's bytes per step. ``setting``: replicas, batch, steps, warmup, size, lr."""
    dev = launch.device()
    mesh = mesh_of(setting["replicas"], world, dev)
    steps, warmup = setting["steps"], setting["warmup"]
    out = {}
    for name in [NATIVE, *names]:
        torch.manual_seed(0)
        model, x, y, loss_fn = build_model(model_name, setting["batch"], setting["size"])
        model = model.to(dev)
        sharded = Sharded(model, mesh, None if name == NATIVE else name, setting["lr"])
        opt, state, batch = sharded.optimizer, sharded.state, (x.to(dev), y.to(dev), loss_fn)
        times, counted, before = [], None, None
        for i in range(warmup + steps):
            if i == warmup:
                counted = _count(counter)
                before = state.stats()["total"]["wire_bytes"] if state is not None else None
            times.append(_step(model, opt, batch, dev))
        after = _count(counter)
        out[name] = {
            "times": times[warmup:],
            "wire_bytes": (state.stats()["total"]["wire_bytes"] - before) / steps if state is not None else None,
            "counted_bytes": (after - counted) / steps if counted is not None and after is not None else None,
            "params": sum(p.numel() for p in model.parameters()),
        }
        del model, opt, state, sharded
    return out


def _count(counter: Any) -> int | None:
    if counter is None:
        return None
    dist.barrier()
    value: int = counter()
    return value


# the goals between emulated nodes: link bytes per step at most 1/N of native HSDP's, and step
# time at least S times faster at 100 Mb/s
BYTE_GOALS = {"ef-sgdm": 25.0, "qsparse": 200.0}
SPEED_GOALS = {"ef-sgdm": 3.0, "qsparse": 3.0, "powersgd": 3.0}


def summarize(model: str, results: list[dict], nodes: int) -> list[dict]:
    """One row per hook: step time (median, slowest rank) and the link's bytes per node per
    step, each beside native HSDP's, as ratios."""

    def step_ms(hook: str) -> float:
        return 1000 * max(statistics.median(r["fsdp"][hook]["times"]) for r in results)

    def link_mb(hook: str, key: str) -> float | None:
        values = [r["fsdp"][hook][key] for r in results]
        if any(v is None for v in values):
            return None
        return sum(values) / nodes / 2**20

    native_ms, native_mb = step_ms(NATIVE), link_mb(NATIVE, "counted_bytes")
    rows = []
    for hook in results[0]["fsdp"]:
        ms, mb = step_ms(hook), link_mb(hook, "counted_bytes")
        rows.append(
            {
                "model": model,
                "hook": hook,
                "step_ms": ms,
                "native_ms": native_ms,
                "speedup": native_ms / ms,
                "link_mb": mb,
                "native_link_mb": native_mb,
                "bytes_ratio": native_mb / mb if mb and native_mb else None,
                "stats_mb": link_mb(hook, "wire_bytes") if hook != NATIVE else None,
            }
        )
    return rows


def goals(rows: list[dict], rate: str) -> list[dict]:
    """The goals, checked on the measured rows: (goal, hook, value, met)."""
    out = []
    for row in rows:
        hook = row["hook"]
        if hook in BYTE_GOALS and row["bytes_ratio"] is not None:
            want = BYTE_GOALS[hook]
            out.append(_goal(f"link bytes native/hook >= {want:.0f}", hook, row["bytes_ratio"], want))
        if hook in SPEED_GOALS and rate == "100mbit":
            want = SPEED_GOALS[hook]
            out.append(_goal(f"step native/hook >= {want:.0f}", hook, row["speedup"], want))
    return out


def _goal(goal: str, hook: str, value: float, want: float) -> dict:
    return {"goal": goal, "hook": hook, "value": value, "met": bool(value >= want)}


COLUMNS = [
    ("model", "model", ""),
    ("hook", "hook", ""),
    ("step_ms", "step ms", ".0f"),
    ("speedup", "native/hook", ".2f"),
    ("link_mb", "link MB", ".3f"),
    ("bytes_ratio", "native/hook bytes", ".1f"),
    ("stats_mb", "stats MB", ".3f"),
]


# ---------------------------------------------------------------- convergence (suite fsdp)
class Sharded:
    """A model sharded for a convergence run: native HSDP (``name`` None) or a catalog hook
    through ``register_fsdp``; ``step`` is what the training loop calls."""

    def __init__(self, model: nn.Module, mesh: Any, name: str | None, lr: float) -> None:
        self.model, self.mesh = model, mesh
        shard(model, mesh if name is None else mesh["shard"])
        if name is None:
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
            self.state = None
        else:
            entry = catalog.ENTRIES[name]
            self.optimizer = entry.optimizer(model.parameters(), lr * entry.lr_scale)
            self.state = entry.state().register_fsdp(model, self.optimizer, mesh=mesh)
        self._shard_numel = sum(p.to_local().numel() for p in model.parameters())

    def traffic(self, steps: int) -> dict[str, float]:
        """Wire bytes and paper bits per worker after ``steps`` steps (native HSDP: an fp32 ring
        all-reduce of every shard between the replicas each step, counted here)."""
        if self.state is not None:
            total = self.state.stats()["total"]
            return {"wire_bytes": total["wire_bytes"], "paper_bits": total["paper_bits"]}
        from ddp_hooks.core.stats import wire_factor

        payload = 4 * self._shard_numel * steps  # the fp32 shard, every step
        factor = wire_factor("all_reduce", self.mesh["replicate"].size())
        return {"wire_bytes": payload * factor, "paper_bits": 8 * payload}

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
        """Test loss and accuracy of the replicas' mean model (every rank takes part)."""
        group = self.mesh["replicate"].get_group()
        locals_ = [p.to_local() for p in self.model.parameters()]
        saved = [t.clone() for t in locals_]
        for t in locals_:
            dist.all_reduce(t, group=group)
            t.div_(dist.get_world_size(group))
        self.model.eval()
        loss, correct = 0.0, 0
        for i in range(0, len(x), batch):
            logits = self.model(x[i : i + batch])
            loss += nn.functional.cross_entropy(logits, y[i : i + batch], reduction="sum").item()
            correct += (logits.argmax(1) == y[i : i + batch]).sum().item()
        self.model.train()
        for t, s in zip(locals_, saved):
            t.copy_(s)
        return loss / len(x), correct / len(x)
