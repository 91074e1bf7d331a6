"""CPU kernels: packed linear layers (`linear`), paged decode attention (`attention`), one-pass
RMSNorm / rotary + K/V store / SiLU*up (`fused`). Every Numba function lives in `numba_kernels`:
Numba's disk cache notices edits to a cached function's own file only, so callers and callees stay
together there.
"""
