"""How a state learns its model and its optimizer: ``register(ddp)`` for a DDP model,
``register_fsdp(model, mesh=...)`` for a ``fully_shard`` model (:mod:`.fsdp`), or ``attach``
and ``bind_optimizer`` for frameworks that register the hook themselves."""

from typing import Any

import torch
from torch._C._distributed_c10d import GradBucket
from torch.futures import Future
from typing_extensions import Self

from .._version import __version__
from . import fsdp
from .agree import agree
from .binding import Binding
from .bucket import Bucket
from .fsdp_hook import ShardFeed
from .model import ModelView, SeenParameters, check_ddp, model_problems
from .optimizer import OptimizerLink


def comm_hook(state: "Registration", bucket: GradBucket) -> Future[torch.Tensor]:
    """The DDP communication hook of every state in this library.

    ``ddp.register_comm_hook(state, ddp_hooks.comm_hook)`` is what :meth:`Registration.register`
    does (call ``state.attach(ddp)`` too, to checkpoint the state).
    """
    return state.run(bucket)


class Registration(Binding):
    """The model-facing half of :class:`~ddp_hooks.core.HookState`."""

    sparse_gradients: bool
    step: int
    _seen: SeenParameters
    _link: OptimizerLink

    def run(self, bucket: GradBucket) -> Future[torch.Tensor]:
        raise NotImplementedError

    def feed(self, bucket: Bucket) -> Future[torch.Tensor]:
        raise NotImplementedError

    def needs_last_bucket(self) -> bool:
        raise NotImplementedError

    def attach(self, model: torch.nn.Module) -> Self:
        """Learn the parameters of ``model`` (a DDP model or its module). One state, one model."""
        return self._adopt(model, ModelView(model))

    def _adopt(self, model: torch.nn.Module, view: ModelView) -> Self:
        if self._model is not None:
            if self._model.is_of(model):
                return self
            raise ValueError("this state is already registered on another model: use one state per model")
        problems = model_problems(getattr(model, "module", model), self.sparse_gradients)
        if problems:
            raise ValueError(f"{type(self).__name__} cannot serve this model: " + "; ".join(problems))
        if not view.named:
            raise ValueError("the model has no trainable parameters")
        self._model = view
        self._model_and_group()
        return self

    def model_view(self) -> ModelView:
        if self._model is None:
            raise RuntimeError(
                f"{type(self).__name__} does not know the model: use state.register(ddp) or call state.attach(ddp)"
            )
        return self._model

    def _param_ids(self) -> set[int]:
        """Ids of the parameters the optimizer must step."""
        if self._model is None:
            return set(self._seen.ids)
        return {id(self._model.handle(p)) for p in self._model.params}

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._link.optimizer

    def bind_optimizer(self, optimizer: Any) -> None:
        """Follow ``optimizer`` (validated first): its learning rates and its steps."""
        self._link.bind(optimizer)

    def _follow(self, optimizer: Any) -> None:
        if optimizer is not None:
            self.bind_optimizer(optimizer)
        else:
            self._link.discover()

    def learning_rates(self, params: list[torch.Tensor]) -> list[float]:
        """The current learning rate of each parameter, read from the followed optimizer."""
        optimizer = self._link.optimizer
        if optimizer is None:
            raise RuntimeError(
                f"{type(self).__name__} reads the learning rate from its optimizer, which it has not seen "
                "step yet: pass it to register(ddp, optimizer) or call bind_optimizer(optimizer)"
            )
        lr_of = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
        model = self._model
        return [lr_of[id(model.handle(p) if model is not None else p)] for p in params]

    def register(self, ddp: Any, optimizer: Any = None) -> Self:
        """Register this state on ``ddp`` in one line; returns the state.

        ``optimizer``: the optimizer that steps ``ddp``'s parameters (found automatically at
        its first step when omitted)."""
        check_ddp(ddp)
        self.attach(ddp)
        self._ready()
        self._follow(optimizer)
        ddp.register_comm_hook(self, comm_hook)
        return self

    def register_fsdp(self, model: torch.nn.Module, optimizer: Any = None, *, mesh: Any) -> Self:
        """Run the algorithm between the replicas of a ``fully_shard`` model; returns the state.

        ``mesh``: the 2-D ``DeviceMesh`` with dimensions ``("replicate", "shard")``; every
        module of ``model`` must be sharded with ``fully_shard(module, mesh=mesh["shard"])``
        (not with the 2-D mesh, where FSDP's native HSDP does the exchange itself). Call it
        after ``fully_shard`` of the root. The state's group becomes the replicate group: its
        worker index and count are the replica's (:mod:`.fsdp`). Needs torch 2.7 or later.
        ``optimizer``: as for :meth:`register`."""
        if fsdp.torch_version() < fsdp.MIN_TORCH:
            raise ValueError(
                f"register_fsdp needs torch 2.7 or later (FSDPModule.set_all_reduce_hook), this is {torch.__version__}"
            )
        replicate, shard, blocks = fsdp.check_mesh(mesh)
        if self.bound:
            raise ValueError("register_fsdp() takes a state that has not run yet: create a new state")
        if self._node_spec is not None:
            raise ValueError("node_size does not apply to register_fsdp: the shard group is the node; leave it None")
        if self._group_arg is not None and self._group_arg is not replicate:
            raise ValueError(
                "process_group must be left unset for register_fsdp: the state runs over mesh['replicate']"
            )
        found = fsdp.shards_of(model, shard)
        # every rank alike (the model by its global shapes) before any group is made; each
        # replicate group then agrees on its shards, and which shard, at binding
        name = type(self).__name__
        fields = {"algorithm": name, "version": __version__, **self.config(), "model": ModelView(model).digest()}
        agree(fsdp.world(), fields, name)
        self._group_arg, self._carrier = replicate, fsdp.Replicas(blocks, shard)
        self._adopt(model, ModelView(model, found.named, found.handles))
        self._ready()
        self._follow(optimizer)
        carrier = self._carrier

        def agree_flag(flag: torch.Tensor) -> torch.Tensor:
            return carrier.combine(flag, self.step, largest=True)

        ShardFeed(self.feed, agree_flag, self.needs_last_bucket).install(found.groups)
        return self
