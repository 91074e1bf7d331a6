"""The engine: the step loop (`core`), its Trio face (`async_engine`), the scheduler and the
engine <-> server contract (`api`, `args`).

`api`, `args`, `scheduler` and `slots` import no torch (the server and the scheduler's tests load
them cheaply); `core` imports `runtime.model`, `runtime.sampling` and `runtime.text`.
"""
