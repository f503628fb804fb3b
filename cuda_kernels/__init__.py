"""CUDA sources of ddp_hooks' fused kernels (no Python API here: ``ddp_hooks.kernels`` builds
them with torch.utils.cpp_extension on first use). Packaged so that a wheel carries them."""
