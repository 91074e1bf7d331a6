"""nurserve runtime: model code, KV pool, scheduler, sampler and engine."""
