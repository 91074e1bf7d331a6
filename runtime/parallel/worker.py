"""A tensor-parallel worker (`python -m runtime.parallel.worker SPEC_JSON`), spawned by rank 0.

It loads its shard, says `loaded` on its control pipe (its stdout; its logs go to stderr), joins
the process group, reads the KV capacity, says `ready`, then runs every plan rank 0 writes to
its stdin through the same `shard_forward` as rank 0. It leaves when its stdin ends (rank 0
exited or died), when a collective fails (a peer died), or when its parent is gone (a poll of
`getppid`: the backstop for a worker stuck anywhere else).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

import torch

from runtime.model.backends import BackendSettings
from runtime.model.config import ModelConfig
from runtime.model.kv_pool import KVPool
from runtime.model.llama import CausalLM
from runtime.parallel.group import DTYPES, WorkerSpec, join_group, open_store
from runtime.parallel.plan import OP_CONFIG, OP_FORWARD, decode_batch, read_frame
from runtime.parallel.shard import Collectives, ShardSpec, load_shard, shard_forward

log = logging.getLogger("nurserve.tp")
PARENT_POLL_S = 0.25
STDIN_FD = 0


def watch_parent(parent_pid: int) -> None:
    """Exit at once (status 1) when the process that spawned us is gone."""

    def poll() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=poll, name="tp-parent-watch", daemon=True).start()


def _load(spec: WorkerSpec) -> tuple[CausalLM, ShardSpec, torch.device]:
    device = torch.device(spec.device)
    if device.type == "cpu" and spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    folder = Path(spec.folder)
    shard = ShardSpec.for_rank(ModelConfig.from_dir(folder), spec.rank, spec.world)
    settings = BackendSettings(**spec.backends)
    model = load_shard(folder, DTYPES[spec.dtype], spec.weights, settings, device, shard)
    return model, shard, device


def serve(spec: WorkerSpec, control: int) -> int:
    """The worker's life after its spec is read; returns its exit status."""
    model, shard, device = _load(spec)
    os.write(control, b"loaded\n")
    join_group(open_store(spec.world, spec.store_port), spec.rank, spec.world, device)
    frame = read_frame(STDIN_FD)
    if frame is None:
        return 0
    op, words = frame
    assert op == OP_CONFIG, op
    pool = KVPool(shard.local_config, int(words[0]), model.dtype, device)
    os.write(control, b"ready\n")
    coll = Collectives(shard)
    log.info("tp rank %d/%d ready: %s", spec.rank, spec.world, _describe(shard))
    while (frame := read_frame(STDIN_FD)) is not None:
        op, words = frame
        assert op == OP_FORWARD, op
        shard_forward(model, pool, decode_batch(words, device), coll)
    return 0


def _describe(shard: ShardSpec) -> str:
    return (
        f"query heads {shard.q_heads}, KV heads {shard.kv_heads}, MLP columns {shard.inter}, "
        f"vocab rows {shard.vocab}"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: argv[0] is the WorkerSpec JSON."""
    spec = WorkerSpec.from_json((argv or sys.argv[1:])[0])
    control = os.dup(1)  # the control pipe; stray prints go to stderr instead
    os.dup2(2, 1)
    watch_parent(spec.parent_pid)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s tp{spec.rank}: %(message)s"
    )
    try:
        return serve(spec, control)
    except Exception:  # the process ends here; its group needs no goodbye (peers see EOF)
        log.exception("tp rank %d failed", spec.rank)
        return 1


if __name__ == "__main__":
    sys.exit(main())
