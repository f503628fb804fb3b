"""Which compiled code the compress layer runs: ``status()`` says what is active and why.

* the fused CUDA kernels (``cuda_kernels/``), built on first use for the GPU at hand and each
  checked against its torch reference before use; ``DDP_HOOKS_NO_CUDA_EXT=1`` switches them off;
* the fused CPU loops (``ddp_hooks/_ext/csrc/cpu_codec.c``), built on first use with the
  system C compiler; ``DDP_HOOKS_NO_NATIVE=1`` switches them off.

Where neither runs, the torch reference implementations of :mod:`ddp_hooks.compress` do.
"""

from .compress.dispatch import status

__all__ = ["status"]
