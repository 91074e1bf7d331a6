"""Tensor parallelism (`--tp N`): N processes in one torch.distributed group, each holding a
shard of every layer (`shard.py`), rank 0 in the server process sending each step's batch plan to
the spawned workers (`plan.py`, `launch.py`, `worker.py`)."""
