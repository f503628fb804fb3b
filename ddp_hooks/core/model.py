"""The one model a state serves: its trainable parameters, by name and by identity."""

import hashlib
import weakref

import torch


class ModelView:
    """Trainable parameters of a module (a DDP model or its ``module``), in registration order."""

    def __init__(self, model: torch.nn.Module) -> None:
        module = getattr(model, "module", model)
        self._module = weakref.ref(module)
        self.named: dict[str, torch.Tensor] = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.names: dict[int, str] = {id(p): n for n, p in self.named.items()}

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
