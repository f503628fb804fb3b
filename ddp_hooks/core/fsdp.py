"""FSDP2 and HSDP: the algorithm runs between the replicas of a ``fully_shard`` model.

In HSDP the parameters are sharded inside a group of ranks (the ``"shard"`` dimension of a 2-D
device mesh: reduce-scatter and all-gather over the fast fabric) and replicated across the
groups (the ``"replicate"`` dimension: one all-reduce of every gradient shard per step over the
slow link). When the model is sharded with the 1-D ``mesh["shard"]`` only, FSDP2 reduce-scatters
inside the shard group and hands each parameter group's flat reduce-scatter output to the hook
set with ``FSDPModule.set_all_reduce_hook`` (torch 2.7 and later); :mod:`.fsdp_hook` feeds that
output to the algorithm as one bucket, between the ranks that hold the same shard.

What the algorithm sees:

* the bucket of a parameter group holds the local shards of its parameters, in FSDP's order,
  without FSDP's padding (a copy when a shard is padded, the output itself otherwise);
* the parameters are the local shards (``DTensor.to_local()``): per-parameter memory (errors,
  momenta, warm-start factors) is kept per shard, and a matrix is its row block;
* the worker index and count are the replica's (:class:`Replicas`);
* the last parameter group reduced in a backward pass ends the step.

Whether a group's gradient is finite is agreed inside the shard group first (one flag per
group per step over the fast fabric): a non-finite shard on any rank makes the group's
gradient NaN on every rank, so ``GradScaler`` skips the step everywhere.
"""

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist

from ..comm import Transport, partition
from .bucket import Bucket
from .carrier import Flat
from .stats import Stats

#: the torch version whose FSDP2 calls an all-reduce hook with the reduce-scatter output
MIN_TORCH = (2, 7)


def world() -> dist.ProcessGroup:
    """The default process group (it exists once a state is bound)."""
    group = dist.group.WORLD
    if group is None:
        raise RuntimeError("register_fsdp needs an initialized default process group")
    return group


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


@dataclass
class ShardGroup:
    """One FSDP parameter group: its shards and where each lies in the flat reduce output."""

    params: list[torch.Tensor]
    #: the parameters the optimizer steps (``DTensor``), one per shard
    handles: list[torch.Tensor]
    offsets: list[int]
    #: whether the shards fill the output with no padding (the output is the bucket)
    dense: bool
    #: FSDP's parameter group (its ``all_reduce_grads`` says whether this backward exchanges)
    fsdp_group: Any

    def exchanges(self) -> bool:
        """False on a micro-step (``set_requires_all_reduce(False)``): the shard stays here."""
        return bool(self.fsdp_group.all_reduce_grads)

    def fold(self, output: torch.Tensor) -> None:
        """Add the gradients FSDP accumulated on earlier micro-steps into ``output`` and zero
        them (FSDP adds the output to them after the hook), so the whole gradient is exchanged."""
        for at, p, h in zip(self.offsets, self.params, self.handles):
            if h.grad is not None:
                local = cast(Any, h.grad)._local_tensor
                output[at : at + p.numel()] += local.reshape(-1)
                local.zero_()

    def bucket_of(self, output: torch.Tensor, is_last: bool) -> Bucket:
        if self.dense:
            return Bucket(output[: sum(p.numel() for p in self.params)], self.params, is_last)
        pieces = [output[at : at + p.numel()] for at, p in zip(self.offsets, self.params)]
        return Bucket(torch.cat(pieces), self.params, is_last)

    def write_back(self, reduced: torch.Tensor, output: torch.Tensor) -> None:
        if self.dense:
            if reduced.data_ptr() != output.data_ptr():
                output[: reduced.numel()].copy_(reduced)
            return
        for at, piece, p in zip(self.offsets, reduced.split([p.numel() for p in self.params]), self.params):
            output[at : at + p.numel()].copy_(piece)

    def write_grads(self, reduced: torch.Tensor) -> None:
        """Write a reduction that finished after FSDP took the output into the gradients."""
        for piece, h in zip(reduced.split([p.numel() for p in self.params]), self.handles):
            assert h.grad is not None  # FSDP set it after this group's hook
            cast(Any, h.grad)._local_tensor.view(-1).copy_(piece)


@dataclass
class Shards:
    """What :func:`shards_of` finds in a ``fully_shard`` model."""

    #: name -> local shard, for every trainable parameter
    named: dict[str, torch.Tensor]
    #: id(local shard) -> the parameter the optimizer steps (the ``DTensor``)
    handles: dict[int, torch.Tensor]
    #: (FSDP module, its group), in module order
    groups: list[tuple[Any, ShardGroup]]


class Replicas(Flat):
    """The carrier of a sharded model: a worker is a replica, formed by the ranks of a shard
    group, each serving its own shards (``ranks_per_worker`` = the shard count). The algorithm
    runs between the ranks that hold the same shard (the replicate group); quantities of a
    worker's whole gradient are summed over its shard group. ``blocks`` lists every replicate
    group's global ranks, so that the transport's later stages get groups of their own, created
    on every rank alike."""

    def __init__(self, blocks: list[list[int]], shard_group: dist.ProcessGroup) -> None:
        self.blocks = blocks
        self.shard_group = shard_group
        self.ranks_per_worker = dist.get_world_size(shard_group)

    def connect(self, group: dist.ProcessGroup, stages: int, stats: Stats) -> Transport:
        """The transport over groups of this rank's replicate group made here, one per stage,
        with the default group's timeout (a device mesh's groups take torch's default of 30
        minutes, whatever timeout the user gave ``init_process_group``)."""
        groups = partition(world(), self.blocks, copies=stages)
        return Transport(groups[0], stats, stages, side_groups=groups[1:])

    def combine(self, tensor: torch.Tensor, step: int, largest: bool) -> torch.Tensor:
        op = dist.ReduceOp.MAX if largest else dist.ReduceOp.SUM
        dist.all_reduce(tensor, op=op, group=self.shard_group)
        return tensor

    def identity(self) -> dict[str, Any]:
        return {"shard": dist.get_rank(self.shard_group), "shards": self.ranks_per_worker}


def check_mesh(mesh: Any) -> tuple[dist.ProcessGroup, dist.ProcessGroup, list[list[int]]]:
    """The replicate and shard process groups of a 2-D mesh, and the global ranks of every
    replicate group; ValueError for anything else."""
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise ValueError(f"mesh must be a 2-D DeviceMesh ('replicate', 'shard'), got {type(mesh).__name__}")
    if mesh.ndim != 2:
        raise ValueError(
            f"mesh must be 2-D ('replicate', 'shard'), got a {mesh.ndim}-D mesh: with a 1-D mesh over all ranks "
            "every rank holds a different shard and there is no exchange between replicas to compress"
        )
    names = mesh.mesh_dim_names or ("replicate", "shard")
    if set(names) != {"replicate", "shard"}:
        raise ValueError(f"mesh dimensions must be named ('replicate', 'shard'), got {names}")
    ranks = mesh.mesh if names[0] == "replicate" else mesh.mesh.t()
    blocks = [ranks[:, j].tolist() for j in range(ranks.shape[1])]
    return mesh["replicate"].get_group(), mesh["shard"].get_group(), blocks


def shards_of(model: torch.nn.Module, shard_group: dist.ProcessGroup) -> Shards:
    """The local shards of ``model``'s trainable parameters and its FSDP parameter groups.
    ValueError where the model is not sharded with ``fully_shard(..., mesh=mesh["shard"])``."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        raise ValueError(f"register_fsdp() takes the root module sharded with fully_shard, got {type(model).__name__}")
    model._get_fsdp_state()._lazy_init()  # what the first forward does: fixes the shards' storage
    sharded: set[int] = set()  # ids of the DTensor parameters FSDP shards
    groups: list[tuple[Any, Any]] = []
    for name, module in model.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        found = _param_groups(module)
        if len(found) > 1:
            raise ValueError(f"FSDP module {name or '<root>'} has several parameter groups (per-parameter meshes)")
        for group in found:
            _check_group(group, name, shard_group)
            groups.append((module, group))
            for fp in group.fsdp_params:
                sharded.add(id(fp.sharded_param))
    named: dict[str, torch.Tensor] = {}
    handles: dict[int, torch.Tensor] = {}
    local_of: dict[int, torch.Tensor] = {}  # id(DTensor parameter) -> its local shard
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) not in sharded:
            raise ValueError(f"parameter {name!r} is not sharded by fully_shard: shard every module that holds one")
        local = cast(Any, p)._local_tensor  # the shard itself (to_local() may return a new alias)
        named[name], handles[id(local)], local_of[id(p)] = local, p, local
    return Shards(named, handles, [(m, _layout(g, local_of)) for m, g in groups])


def _param_groups(module: Any) -> list[Any]:
    state = module._get_fsdp_state()
    many = getattr(state, "_fsdp_param_groups", None)
    if many is not None:
        return list(many)
    one = getattr(state, "_fsdp_param_group", None)
    return [one] if one is not None else []


def _check_group(group: Any, name: str, shard_group: dist.ProcessGroup) -> None:
    where = name or "<root>"
    if getattr(group, "_is_hsdp", False):
        raise ValueError(
            f"FSDP module {where} is sharded with the 2-D mesh (native HSDP all-reduces between the replicas "
            "itself): shard with fully_shard(..., mesh=mesh['shard'])"
        )
    ranks = dist.get_process_group_ranks(group.mesh_info.shard_process_group)
    if ranks != dist.get_process_group_ranks(shard_group):
        raise ValueError(f"FSDP module {where} is sharded over ranks {ranks}, not over mesh['shard']")


def _layout(group: Any, local_of: dict[int, torch.Tensor]) -> ShardGroup:
    params: list[torch.Tensor] = []
    handles: list[torch.Tensor] = []
    offsets: list[int] = []
    at, dense = 0, True
    for fp in group.fsdp_params:
        local = local_of.get(id(fp.sharded_param))
        padded = fp.padded_sharded_param_size.numel()
        if local is not None:  # frozen parameters are in the output too, and skipped
            params.append(local)
            handles.append(fp.sharded_param)
            offsets.append(at)
            dense = dense and local.numel() == padded
        else:
            dense = False
        at += padded
    return ShardGroup(params, handles, offsets, dense, group)
