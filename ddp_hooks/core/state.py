"""The base every algorithm's state builds on.

A state is what ``ddp.register_comm_hook(state, comm_hook)`` receives. It can be constructed
anywhere, before ``init_process_group`` too (Lightning users build it before the workers
exist): the process group, rank, world size and transport are resolved at :meth:`register`
or at the first hook call. :class:`HookState` counts training steps through
``bucket.is_last()``, runs the optional exact warm-up, owns the per-parameter memory and the
transport, follows the user's optimizer (:mod:`.optimizer`), checks once that every rank is
configured alike (:mod:`.agree`) and makes all of it checkpointable (:mod:`.checkpoint`).
An algorithm subclasses it and implements :meth:`HookState.reduce`.
"""

from dataclasses import fields
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import GradBucket
from torch.futures import Future
from typing_extensions import Self, Unpack

from ..comm import Transport, chain
from . import checkpoint
from .agree import agree
from .binding import Runtime
from .bucket import Bucket
from .carrier import Carrier
from .checks import check_int
from .held import HeldBuckets, LocalPhase
from .memory import ParameterMemory
from .model import PYTHON_REDUCER, ModelView, SeenParameters
from .node import NodeSize, check_node_size
from .optimizer import OptimizerLink
from .registration import Registration, comm_hook
from .settings import Settings, constructor_fields, document
from .stats import Stats

__all__ = ["HookState", "comm_hook"]


class HookState(Registration):
    """Shared machinery of a compression hook.

    Args:
        settings: the algorithm's hyper-parameters (default: :attr:`settings_type`'s defaults).
        process_group: the group to reduce over (default: the default group, at first use).
        warmup_steps: number of first training steps reduced by an exact fp32 all-reduce,
            bit-identical to DDP without a hook.
        node_size: ranks per node for the node-aware mode (:mod:`.node`): exact mean inside
            each node, the algorithm between nodes, each local rank serving a fixed share of
            the parameters. ``"auto"`` reads torchrun's ``LOCAL_WORLD_SIZE``; None (default)
            or 1: every rank is a worker.
    """

    #: dependent collective rounds per bucket (each later round gets its own process group)
    stages: int = 1
    #: memory slots whose pieces have the size of their parameter
    memory_slots: tuple[str, ...] = ()
    #: whether the algorithm reduces sparse gradients (``nn.Embedding(sparse=True)``)
    sparse_gradients: bool = False
    #: whether the algorithm can start after exact warm-up steps (``warmup_steps``)
    warmup: bool = True
    #: the algorithm's hyper-parameters (its docstring's ``Args:`` are written from them)
    settings_type: ClassVar[type[Settings]] = Settings

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "settings_type" in cls.__dict__:
            cls.__doc__ = document(cls, cls.settings_type)

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        process_group: dist.ProcessGroup | None = None,
        warmup_steps: int = 0,
        node_size: NodeSize = None,
    ) -> None:
        self.settings = settings if settings is not None else self.settings_type()
        if type(self.settings) is not self.settings_type:
            raise TypeError(
                f"{type(self).__name__} takes {self.settings_type.__name__}, got {type(self.settings).__name__}"
            )
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0, 2**62)
        if self.warmup_steps and not self.warmup:
            raise ValueError(f"{type(self).__name__} takes no warmup_steps, got {warmup_steps}")
        self._node_spec = check_node_size(node_size)
        self._carrier: Carrier | None = None
        self._on_attach_done = False
        self.step = 0
        self.memory = ParameterMemory()
        self._group_arg = process_group
        self._group: dist.ProcessGroup | None = None
        self._transport: Transport | None = None
        self._agreed = False
        self._steps_agreed = False
        self._stats = Stats()
        self._model: ModelView | None = None
        self._seen = SeenParameters()
        self._held = HeldBuckets()
        self._local = LocalPhase()
        self._stepped_at = 0  # the step the optimizer last stepped after
        self._link = OptimizerLink(self.check_optimizer, self._optimizer_stepped, self._param_ids)

    @classmethod
    def from_settings(cls, settings: Settings, **runtime: Unpack[Runtime]) -> Self:
        """The state of these ``settings`` (e.g. ``dataclasses.replace(state.settings, ...)``);
        ValueError if this class's constructor cannot make them (a preset's fixed fields)."""
        if type(settings) is not cls.settings_type:
            raise TypeError(f"{cls.__name__} takes {cls.settings_type.__name__}, got {type(settings).__name__}")
        state = cls(**{n: getattr(settings, n) for n in constructor_fields(cls)}, **runtime)
        differ = [f.name for f in fields(settings) if getattr(state.settings, f.name) != getattr(settings, f.name)]
        if differ:
            raise ValueError(f"{cls.__name__}'s constructor does not set {', '.join(differ)} as these settings do")
        return state

    # ---- what an algorithm defines ----------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The configuration every rank must share and a checkpoint records: the runtime's
        fields, then the algorithm's :attr:`settings`."""
        runtime: dict[str, Any] = {"warmup_steps": self.warmup_steps}
        if self._node_spec is not None:  # the resolved size once a worker has several ranks
            per = self._carrier.ranks_per_worker if self._carrier is not None else 1
            runtime["node_size"] = per if per > 1 else self._node_spec
        if self._carrier is not None:
            runtime.update(self._carrier.identity())
        return {**runtime, **self.settings.identity()}

    @property
    def keeps_local_models(self) -> bool:
        """Whether the workers' models (and optimizer states) differ between synchronizations
        (the local-step algorithms): a checkpoint must then hold every worker's, e.g. one
        ``torch.distributed.checkpoint`` folder per replica of a sharded model."""
        return False

    def reduce(self, bucket: Bucket, step: int) -> Future[torch.Tensor]:
        """Compress, communicate and decompress one bucket; the future holds the new gradient."""
        raise NotImplementedError

    def needs_last_bucket(self) -> bool:
        """Whether :meth:`reduce` must see the step's last bucket even when it holds none of
        this rank's parameters (node-aware mode): algorithms that hold buckets until the last."""
        return False

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise ValueError if ``optimizer`` cannot be combined with this algorithm."""

    def after_step(self) -> None:
        """The algorithm's work after each step of the optimizer it follows (override)."""

    def _optimizer_stepped(self) -> None:
        """After an optimizer step: :meth:`after_step`, once per reduced step. A step that no
        backward through the hook came before is not the algorithm's: e.g. the one
        ``torch.distributed.checkpoint.state_dict.get_state_dict`` takes at learning rate 0,
        with zero gradients, to create the optimizer's state."""
        if self.step == self._stepped_at:
            return
        self._stepped_at = self.step
        self.after_step()

    def memory_numel(self, slot: str, param: torch.Tensor) -> int | None:
        """Size of ``param``'s piece in ``slot``; None: no such slot (checkpoint validation)."""
        return param.numel() if slot in self.memory_slots else None

    def extra_state_dict(self) -> dict[str, Any]:
        """Algorithm-specific counters and tensors to checkpoint (override)."""
        return {}

    def extra_problems(self, extra: Any) -> list[str]:
        """What keeps ``extra`` (with the keys of :meth:`extra_state_dict`, checked before) from being
        loaded by :meth:`load_extra_state_dict` (override)."""
        return []

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state_dict` returned (override)."""

    # ---- the hook -----------------------------------------------------------------------------
    def run(self, bucket: GradBucket) -> Future[torch.Tensor]:
        """Hook body for a DDP bucket (see :meth:`feed`)."""
        if isinstance(bucket, tuple):
            raise RuntimeError(PYTHON_REDUCER)
        return self.feed(Bucket.of(bucket))

    def feed(self, view: Bucket) -> Future[torch.Tensor]:
        """Count the step, warm up exactly, else hand ``view`` over to :meth:`reduce`."""
        self._ready()
        if not self._steps_agreed:  # the first hook after start or after a load
            name = type(self).__name__
            agree(self._bind(), {"step": self.step}, name, f"ranks resumed {name} from different steps")
            self._steps_agreed = True
        step = self.step
        if self._model is None:
            if self.partial:
                raise RuntimeError("node_size needs the model: use state.register(ddp) or call state.attach(ddp)")
            self._seen.check(view.params, step)
            self._link.discover()
        elif id(view.params[0]) not in self._model.names:
            raise RuntimeError("this state serves another model: one state per DDP model")
        if view.is_last:
            self.step += 1
        logical = view.in_logical_order()
        if logical is not None:  # channels_last: the algorithm sees the gradients in logical order
            view, restore = logical
            return chain(self._reduce_routed(view, step), restore)
        return self._reduce_routed(view, step)

    def _reduce_routed(self, bucket: Bucket, step: int) -> Future[torch.Tensor]:
        return self.carrier.reduce(bucket, step, self._reduce_counted, self.needs_last_bucket())

    def _reduce_counted(self, bucket: Bucket, step: int) -> Future[torch.Tensor]:
        self._stats.elements(step, bucket.buffer.numel())
        if step < self.warmup_steps:
            return self.exact_mean(bucket.buffer, step)
        return self.reduce(bucket, step)

    def exact_mean(self, buffer: torch.Tensor, step: int, stage: int = 0) -> Future[torch.Tensor]:
        """Mean all-reduce exactly as DDP does without a hook (scale by 1/n, then sum)."""
        buffer.mul_(1.0 / self.world_size)
        self._stats.paper_bits(step, 8 * buffer.numel() * buffer.element_size())
        return self.transport.all_reduce(buffer, step, stage)

    def keep_local(self, bucket: Bucket, step: int) -> Future[torch.Tensor]:
        """A local phase: the gradient stays on this rank, but whether the step is finite is
        agreed: one flag per step (all-reduced at the last bucket), so that ``GradScaler``
        skips the same steps on every rank. A rank's non-finite step makes every bucket NaN
        on every rank (node-aware: the flag is summed over the node first)."""
        return self._local.keep(
            bucket.buffer,
            bucket.params,
            bucket.is_last,
            lambda flag: self.transport.all_reduce(self.combine(flag, step), step),
        )

    # ---- helpers for algorithms ----------------------------------------------------------------
    def served_params(self) -> list[torch.Tensor]:
        """The model's parameters the algorithm serves on this rank (all of them, or this
        rank's share where it serves part of its worker: see :attr:`partial`)."""
        params = self.model_view().params
        return self.carrier.served(params)

    def combine(self, tensor: torch.Tensor, step: int, largest: bool = False) -> torch.Tensor:
        """The sum (``largest``: maximum) of ``tensor`` over the ranks that serve this worker,
        for quantities of the worker's whole gradient (see :attr:`partial`); ``tensor`` itself
        where this rank is the whole worker."""
        return self.carrier.combine(tensor, step, largest)

    def publish(self, step: int) -> None:
        """After a synchronization of :meth:`served_params`: every rank that serves this
        worker takes the values the owners of the other parameters just synchronized (nothing
        where this rank is the whole worker)."""
        self.carrier.publish(self.model_view().params, step)

    def time(self, step: int, phase: str, device: torch.device) -> Any:
        """Context manager that adds the block's time to ``compress_s`` or ``decompress_s``."""
        return self._stats.timer(step, phase, device)

    def count_bits(self, step: int, bits: float) -> None:
        """Record the payload bits the algorithm's paper counts for this step."""
        self._stats.paper_bits(step, bits)

    # ---- reporting and checkpoints -------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Bytes, paper bits, ratio to fp32 all-reduce and codec time: last step and total."""
        out = self._stats.summary(self.step)
        out["algorithm"] = type(self).__name__
        if self._carrier is not None:
            out.update(self._carrier.report(self.step))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything this rank needs to resume exactly: step, memory, counters, RNG states."""
        self._bind()
        return checkpoint.state_dict(self, self._stats)

    def problems(self, state: Any) -> list[str]:
        """What keeps ``state`` (a :meth:`state_dict`) from loading here, each named: another
        algorithm, configuration, world size, rank or model, a format this version does not
        read, a damaged part. Empty: it loads."""
        self._bind()
        return checkpoint.problems(self, state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of the same algorithm, configuration, world size, rank
        and model. Everything is checked first (:meth:`problems`): a checkpoint that does not
        fit raises ValueError naming what differs, and nothing is changed."""
        problems = self.problems(state)
        if problems:
            raise ValueError(f"cannot load {type(self).__name__} state: " + "; ".join(problems))
        checkpoint.load_state_dict(self, state, self._stats)
        self._steps_agreed = False
        self._stepped_at = self.step  # a checkpoint is taken after the optimizer's step
