"""nurserve's inference runtime: everything below the HTTP layer, and nothing of HTTP.

The request path, top down: `engine/` (the step loop, its Trio face, the scheduler) ->
`model/` (the runner that turns a step plan into one forward, the Llama-family model, KV pool,
CUDA graphs) -> `kernels/` (CPU and Triton kernels the model's layers call) and `sampling/`
(parameters, the batched sampler). `loading/` builds models from checkpoints; `text/` holds the
tokenizer and the incremental detokenizer. May import `cuda` (kernels with CPU twins); never
`server`.
"""

import os

# OpenMP workers spin briefly (GOMP_SPINCOUNT iterations, ~0.1 ms) after a parallel region, then
# sleep. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) costs a wake-up of 50-100 us per parallel call
# on these VMs: a batch-1 decode step makes ~150 of them (profiling/README.md, "OpenMP wake-ups");
# spinning without bound starves the other runtime's threads and the HTTP thread. Both OpenMP
# runtimes in the process (torch's, Numba's omp layer) read it; only effective before torch
# loads; an explicit setting (either variable) wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
