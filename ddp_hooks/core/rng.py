"""The two random streams of an algorithm, never the global RNG the user's data pipeline uses.

* ``shared``: seeded identically on every rank and advanced identically, for draws every rank
  must agree on (GRBS selections, PowerSGD's initial Q);
* ``own``: seeded per worker, for draws that must differ between workers (random-k,
  stochastic rounding); checkpointed under the key ``"rank"``.
"""

from typing import Any

import torch

#: ranks' seeds are ``seed + RANK_STRIDE * rank``: streams far apart for any seed
RANK_STRIDE = 1_000_003


class Generators:
    """``shared`` and ``own`` generators from one seed; :meth:`bind` seeds this worker's."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.shared = torch.Generator().manual_seed(seed)
        self.own = torch.Generator().manual_seed(seed)

    def bind(self, rank: int) -> None:
        self.own.manual_seed(self.seed + RANK_STRIDE * rank)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"shared": self.shared.get_state(), "rank": self.own.get_state()}

    @staticmethod
    def problems(saved: Any) -> list[str]:
        reference = torch.Generator().get_state()
        if not isinstance(saved, dict) or set(saved) != {"shared", "rank"}:
            return ["extra['rng'] must hold the 'shared' and 'rank' generator states"]
        return [
            f"extra['rng'][{name!r}] must be a torch.Generator state (uint8 tensor)"
            for name, state in saved.items()
            if not torch.is_tensor(state) or state.dtype != torch.uint8 or state.shape != reference.shape
        ]

    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        self.shared.set_state(saved["shared"])
        self.own.set_state(saved["rank"])
