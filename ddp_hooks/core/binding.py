"""Lazy binding of a state: its process group, the node layer, the configuration agreement and
the transport are resolved at ``register()`` or at the first hook call, not at construction
(Lightning users build states before the workers exist)."""

from typing import Any, TypedDict

import torch.distributed as dist

from .._version import __version__
from ..comm import Transport, is_alive
from .agree import agree
from .carrier import Carrier, Flat
from .model import ModelView
from .node import NodeAware, NodeSize, resolve_node_size
from .stats import Stats


class Runtime(TypedDict, total=False):
    """The options every state takes besides its algorithm's, by keyword:

    * ``process_group``: the group to reduce over (default: the default group, at first use);
    * ``warmup_steps``: first training steps reduced by an exact fp32 all-reduce, bit-identical
      to DDP without a hook (default 0);
    * ``node_size``: ranks per node for the node-aware mode (exact mean inside each node, the
      algorithm between nodes; ``"auto"``: torchrun's ``LOCAL_WORLD_SIZE``; default None: every
      rank is a worker).
    """

    process_group: dist.ProcessGroup | None
    warmup_steps: int
    node_size: NodeSize


class Binding:
    """The group-facing half of :class:`~ddp_hooks.core.HookState`."""

    stages: int
    _group_arg: dist.ProcessGroup | None
    _group: dist.ProcessGroup | None
    _node_spec: NodeSize
    _carrier: Carrier | None
    _stats: Stats
    _agreed: bool
    _model: ModelView | None
    _transport: Transport | None
    _on_attach_done: bool

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def on_attach(self) -> None:
        """Called once the model and the group are known, before the first step (override)."""

    def _bind(self) -> dist.ProcessGroup:
        """The process group, resolved on first use (and checked alive every time)."""
        if self._group is not None:
            if not is_alive(self._group):
                raise RuntimeError(
                    f"the process group {type(self).__name__} was bound to has been destroyed; "
                    "create a new state after init_process_group"
                )
            return self._group
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                f"{type(self).__name__} needs an initialized default process group: call "
                "torch.distributed.init_process_group(...) before register() or the first backward "
                "(launched with one process? a launcher that starts one process sets up no group)"
            )
        group = self._group_arg if self._group_arg is not None else dist.group.WORLD
        assert group is not None  # the default group exists once initialized
        if self._carrier is None:  # else set before binding (a sharded model's replicas)
            size = resolve_node_size(self._node_spec, dist.get_world_size(group), dist.get_rank(group))
            self._carrier = NodeAware(group, size) if size is not None else Flat()
        self._group = group
        self._stats.world_size = self.world_size
        self.on_bind()
        self._model_and_group()
        return group

    def _model_and_group(self) -> None:
        """Once both the model and the group are known: the carrier's ownership, then the
        algorithm's :meth:`on_attach`."""
        if self._on_attach_done or self._model is None or self._group is None:
            return
        self.carrier.own(self._model.params)
        self._on_attach_done = True
        self.on_attach()

    def on_bind(self) -> None:
        """Called once the process group is known (override: per-rank generators)."""

    def _ready(self) -> Transport:
        """Bound, agreed with every rank, and with its transport (side groups are created only
        after the agreement: ranks configured differently would create different groups)."""
        group = self._bind()
        if not self._agreed:
            fields = {"algorithm": type(self).__name__, "version": __version__, **self.config()}
            if self._model is not None:
                fields["parameters"] = self._model.digest()
            agree(group, fields, type(self).__name__)
            self._agreed = True
        if self._transport is None:
            self._transport = self.carrier.connect(group, self.stages, self._stats)
        return self._transport

    @property
    def carrier(self) -> Carrier:
        """How this rank's gradient reaches the algorithm (:mod:`.carrier`; known once bound)."""
        self._bind()
        assert self._carrier is not None  # set by _bind
        return self._carrier

    @property
    def partial(self) -> bool:
        """Whether this rank serves only part of its worker: several ranks form one worker of
        the algorithm, each serving a share of the parameters (the node-aware mode); their
        :meth:`~ddp_hooks.core.HookState.combine` sums quantities of the whole. Known once bound."""
        return self.carrier.ranks_per_worker > 1

    @property
    def bound(self) -> bool:
        """Whether the state has resolved its process group (at register or first use)."""
        return self._group is not None

    @property
    def transport(self) -> Transport:
        return self._ready()

    @property
    def process_group(self) -> dist.ProcessGroup:
        """The group the algorithm runs over (node-aware: the ranks of this local rank)."""
        return self.transport.group if self._node_spec is not None else self._bind()

    @property
    def rank(self) -> int:
        """The algorithm's worker index (node-aware: the node)."""
        return self.carrier.worker(self._bind())[0]

    @property
    def world_size(self) -> int:
        """The algorithm's number of workers (node-aware: of nodes)."""
        return self.carrier.worker(self._bind())[1]

    @property
    def group_rank(self) -> int:
        """This process's rank in the state's whole group."""
        return dist.get_rank(self._bind())

    @property
    def group_size(self) -> int:
        return dist.get_world_size(self._bind())
