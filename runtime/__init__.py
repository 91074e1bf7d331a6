"""nurserve's inference runtime: everything below the HTTP layer, and nothing of HTTP.

The request path, top down: `engine/` (the step loop, its Trio face, the scheduler) ->
`model/` (the runner that turns a step plan into one forward, the Llama-family model, KV pool,
CUDA graphs) -> `kernels/` (CPU and Triton kernels the model's layers call) and `sampling/`
(parameters, the batched sampler). `loading/` builds models from checkpoints; `text/` holds the
tokenizer and the incremental detokenizer. May import `cuda` (kernels with CPU twins); never
`server`.
"""

import os

# Idle OpenMP threads sleep instead of spinning: torch's spinning workers otherwise starve the
# Numba kernels and the HTTP thread of a small machine's cores (profiling/README.md). Only
# effective when set before torch loads; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
