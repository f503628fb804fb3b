"""The one model a state serves: its trainable parameters, by name and by identity."""

import hashlib
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

PYTHON_REDUCER = (
    "DDP's python_reducer mode (torch._dynamo.config.optimize_ddp = 'python_reducer') calls comm "
    "hooks once per parameter inside compiled autograd, and ddp_hooks compresses whole buckets; "
    "use torch.compile with the default optimize_ddp (DDPOptimizer), which runs these hooks as they are"
)


def check_ddp(ddp: object) -> None:
    """Raise ValueError unless ``ddp`` is a DistributedDataParallel model whose hooks see
    whole buckets."""
    if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        raise ValueError(
            f"register() takes the DistributedDataParallel model, got {type(ddp).__name__}: the model is not "
            "DistributedDataParallel. Launched with one process? (e.g. `accelerate launch` without "
            "--num_processes, Lightning without devices=N on a CPU) Wrap it in DDP after init_process_group"
        )
    if getattr(ddp, "_use_python_reducer", False):
        raise ValueError(PYTHON_REDUCER)


#: parameter dtypes the algorithms serve (fp64 models compress in fp32, like 16-bit ones)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def model_problems(module: torch.nn.Module, sparse_ok: bool) -> list[str]:
    """What keeps the algorithms from serving ``module``'s trainable parameters: a dtype they
    do not compute in, or a sparse gradient (``nn.Embedding(sparse=True)``), by parameter name."""
    problems = []
    for name, p in module.named_parameters():
        if p.requires_grad and p.dtype not in DTYPES:
            problems.append(f"parameter {name!r} is {p.dtype} (supported: float32, float64, float16, bfloat16)")
    if not sparse_ok:
        for prefix, sub in module.named_modules():
            if isinstance(sub, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and sub.sparse:
                name = f"{prefix}.weight" if prefix else "weight"
                problems.append(
                    f"parameter {name!r} gets sparse gradients ({type(sub).__name__}(sparse=True)): "
                    "compressed hooks need dense gradients; use sparse=False, or AllReduce"
                )
    return problems


class ModelView:
    """Trainable parameters of a module (a DDP model or its ``module``), in registration order."""

    def __init__(
        self,
        model: torch.nn.Module,
        named: dict[str, torch.Tensor] | None = None,
        handles: dict[int, torch.Tensor] | None = None,
    ) -> None:
        """``named``: the tensors the algorithm serves, by name (default: the trainable
        parameters; a sharded model's local shards); ``handles``: for each of them by id, the
        parameter the optimizer steps (default: itself)."""
        module = getattr(model, "module", model)
        self._module = weakref.ref(module)
        if named is None:
            named = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.named: dict[str, torch.Tensor] = named
        self.names: dict[int, str] = {id(p): n for n, p in self.named.items()}
        self._handles = handles or {}

    def handle(self, param: torch.Tensor) -> torch.Tensor:
        """The parameter the optimizer steps for ``param``."""
        return self._handles.get(id(param), param)

    def is_of(self, model: torch.nn.Module) -> bool:
        return self._module() is getattr(model, "module", model)

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.named.values())

    def layout(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self.named.items()}

    def digest(self) -> str:
        """A short digest of names, shapes and dtypes (for the ranks' configuration check)."""
        text = ";".join(f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in self.named.items())
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class SeenParameters:
    """For a state registered straight with ``ddp.register_comm_hook``: the parameters of the
    buckets of its first step. A bucket with parameters outside them belongs to another model."""

    def __init__(self) -> None:
        self.ids: set[int] = set()
        self.closed = False

    def check(self, params: list[torch.Tensor], step: int) -> None:
        if not self.closed:
            if step == 0:
                self.ids.update(id(p) for p in params)
                return
            self.closed = True
        if any(id(p) not in self.ids for p in params):
            raise RuntimeError(
                "this state serves another model: one state per DDP model (create a second state for the second model)"
            )


@contextmanager
def flat_param(param: torch.Tensor) -> Iterator[torch.Tensor]:
    """``param`` as a flat vector in logical order, for in-place updates: a view when it is
    contiguous, else a copy written back on exit (``channels_last``)."""
    if param.is_contiguous():
        yield param.detach().view(-1)
        return
    flat = param.detach().reshape(-1)
    yield flat
    with torch.no_grad():
        param.copy_(flat.view(param.shape))
