"""Compiled extensions (fused CPU loops, CUDA kernels) and their one loader."""
