"""The model side of a step: config, the Llama-family model assembled from backend layers, the
forward batch and attention metadata, the KV pool, the runner the engine hands a plan to, CUDA
graphs and reward heads.

May import `runtime.kernels`, `runtime.loading`, `runtime.text` and `cuda`; never
`runtime.engine` beyond its plain-data modules (`api`, `args`, `scheduler`'s plan types).
"""
