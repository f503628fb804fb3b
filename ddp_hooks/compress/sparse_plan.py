"""One message of sparse or quantized payloads for a list of tensors, with the non-finite flag.

The one owner of this byte layout: each tensor's fixed-size payload (:class:`~.sparse.Codec`)
at its offset, then a 4-byte flag (1.0 if any of this rank's tensors is not finite).
"""

from collections.abc import Sequence

import torch

from ..core.flags import nonfinite
from .bits import ByteLayout
from .sparse import Codec

Message = tuple[torch.Tensor | None, torch.Tensor]  # indices (None: dense), values


class MessagePlan:
    """Codecs of a list of tensors (``numel`` each) and where each payload sits."""

    def __init__(self, tensors: Sequence[torch.Tensor], kind: str, k: int | float, levels: int) -> None:
        self.codecs = [Codec(kind, t.numel(), k, levels) for t in tensors]
        self.layout = ByteLayout([c.nbytes for c in self.codecs], flag=True)  # the payloads, the flag
        self.paper_bits = sum(c.paper_bits() for c in self.codecs)
        self.nbytes = self.layout.nbytes
        #: fp32 values and an fp32 flag: messages that add up (an all-reduce carries them)
        self.summable = all(c.kind == "none" for c in self.codecs)

    def encode(
        self, vectors: Sequence[torch.Tensor], generator: torch.Generator, shared: torch.Generator
    ) -> tuple[torch.Tensor, list[Message]]:
        """The message of ``vectors`` and each tensor's own (indices, values)."""
        encoded = [c.encode(v, shared if c.kind == "grbs" else generator) for c, v in zip(self.codecs, vectors)]
        return self._message([e[0] for e in encoded], vectors), [(e[1], e[2]) for e in encoded]

    def encode_ef(
        self,
        inputs: Sequence[torch.Tensor],
        errors: Sequence[torch.Tensor],
        generators: tuple[torch.Generator, torch.Generator],
    ) -> tuple[torch.Tensor, list[Message]]:
        """Error-compensated: the message of ``v = input + error`` per tensor, leaving
        ``error = v - q`` in place; ``generators`` is (this rank's, the shared one)."""
        generator, shared = generators
        encoded = [
            c.encode_ef(p, e, shared if c.kind == "grbs" else generator) for c, p, e in zip(self.codecs, inputs, errors)
        ]
        return self._message([e[0] for e in encoded], inputs), [(e[1], e[2]) for e in encoded]

    def _message(self, payloads: list[torch.Tensor], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.layout.join(payloads, torch.stack([nonfinite(v) for v in inputs]).any())

    def mean(
        self,
        gathered: torch.Tensor,
        outputs: Sequence[torch.Tensor],
        local: list[Message] | None,
        divisor: int | None = None,
    ) -> torch.Tensor:
        """Write ``sum_j q_j / divisor`` (default: the mean over the rows) of every tensor into
        ``outputs`` (flat fp32, zeroed here); the rows are added in order, so every rank
        computes the same floats. ``local``: this rank's own messages (the indices of a
        shared-index codec). Returns the 0-d flag: was any row's message not finite?"""
        n = gathered.shape[0]
        for k, (codec, out) in enumerate(zip(self.codecs, outputs)):
            own = None if local is None else local[k][0]
            idx, values = codec.decode(self.layout.field(gathered, k), own)
            out.zero_()
            for j in range(n):
                if idx is None:
                    out.add_(values[j])
                else:
                    out.index_add_(0, idx[j], values[j])  # indices unique within a payload
            out.div_(n if divisor is None else divisor)
        return self.layout.any_flag(gathered)

    def mean_of_sum(self, summed: torch.Tensor, outputs: Sequence[torch.Tensor], divisor: int) -> torch.Tensor:
        """Like :meth:`mean` for the element-wise sum of :attr:`summable` messages (one row of
        bytes): ``outputs = sum / divisor``; the flag is set if any message's was."""
        for k, out in enumerate(outputs):
            out.copy_(self.layout.field(summed, k, torch.float32).reshape(-1)).div_(divisor)
        return self.layout.any_flag(summed)
