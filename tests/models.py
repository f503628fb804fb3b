"""Small models and data shared by the tests (importable by the spawned ranks)."""

import torch
from torch import nn


class Reordered(nn.Module):
    """Layers registered a, b, c but used c(b(a(x)))... in reverse: gradients become ready in
    registration order, so DDP's rebuilt buckets differ from its initial ones."""

    def __init__(self, width: int = 32, depth: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.head = nn.Linear(width, classes)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.stem = nn.Linear(16, width)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


def batches(rank: int, steps: int, batch: int = 8, features: int = 16, classes: int = 5):
    """Deterministic per-rank batches (different data on every rank)."""
    g = torch.Generator().manual_seed(1000 + rank)
    return [
        (torch.randn(batch, features, generator=g), torch.randint(0, classes, (batch,), generator=g))
        for _ in range(steps)
    ]


def train_steps(ddp, opt, data):
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()


def params_of(module):
    return [p.detach().clone() for p in module.parameters()]


def value_errors(factory, cases) -> list[str]:
    """The ValueError message of ``factory(**kwargs)`` for each case (the call must raise)."""
    messages = []
    for kwargs in cases:
        try:
            factory(**kwargs)
        except ValueError as exc:
            messages.append(str(exc))
        else:
            messages.append(f"no ValueError for {kwargs}")
    return messages
