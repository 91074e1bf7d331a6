"""Compute kernels the model's layers call: `cpu/` (Numba, oneDNN/fbgemm packing) and `triton/`.

Kernels take tensors and return tensors: they import torch, numpy and their compiler, never the
model or anything above it.
"""
