"""The process group of `--tp N`: a TCP store on a free loopback port (rank 0 is its master),
NCCL on GPUs and gloo on the CPU, and what a worker is told when it is spawned."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

# A collective waits at most this long for a peer. A peer that dies closes its sockets, which
# fails the collective at once (gloo: "Connection closed by peer"); the timeout only bounds a
# peer that hangs alive. Ranks run the same layer between two collectives, so a healthy wait
# is one layer's compute skew, far below it.
COLLECTIVE_TIMEOUT_S = 60.0
STORE_HOST = "127.0.0.1"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, decided by rank 0 (passed as JSON on its command line)."""

    rank: int
    world: int
    store_port: int
    parent_pid: int
    folder: str
    device: str
    dtype: str  # a DTYPES key
    weights: str  # fp32 | fp16 (CPU packed weights, as `runtime.model.assemble.pack_linears`)
    num_threads: int | None
    backends: dict[str, str] = field(default_factory=dict)  # BackendSettings fields

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))


def backend_for(device: torch.device) -> str:
    """The collective backend of `device`: NCCL on a GPU, gloo on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank `rank`'s device: the next GPU after rank 0's, or the CPU."""
    if device.type == "cuda":
        return torch.device("cuda", (device.index or 0) + rank)
    return device


def open_store(world: int, port: int | None = None) -> dist.TCPStore:
    """Rank 0 (`port=None`): the master store on a free port (its `.port`); others: a client."""
    timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    if port is None:
        return dist.TCPStore(STORE_HOST, 0, world, True, timeout=timeout, wait_for_workers=False)
    return dist.TCPStore(STORE_HOST, port, world, False, timeout=timeout)


def join_group(store: dist.TCPStore, rank: int, world: int, device: torch.device) -> None:
    """Join the default process group (one per process) with the collective timeout."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend_for(device),
        store=store,
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )


def leave_group() -> None:
    """Destroy the default process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
