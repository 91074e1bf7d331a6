"""Sampling: request parameters and their validation (`params`, no torch) and the batched
logit pipeline (`sampler`). May import `cuda` (penalty kernels); nothing else of the runtime."""
