"""CPU kernels: packed linear layers (`linear`), paged decode attention (`attention`), one-pass
RMSNorm / rotary + K/V store / SiLU*up (`fused`), greedy sampling (`sample_greedy`), and GGUF
block-quantized weights (`quant*`: the int16 mode's integer GEMV in `quant_int16`, exact mode's
lane layout in `quant_lanes`, the K formats and fast mode in `quant_numba`, all behind
`quant_linear`). Numba's disk cache notices edits to a cached function's own file only, so each
kernel module keeps its callers and callees together (`numba_kernels` for the dense path's).
Imports torch, numpy, numba and llvmlite; never the model.
"""
