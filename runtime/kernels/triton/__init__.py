"""Triton kernels (GPU): split-K decode attention over the token-slot KV pool, with its torch
reference. Triton is imported lazily, so the package imports on a CPU-only machine."""
