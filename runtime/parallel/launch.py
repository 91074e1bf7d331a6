"""Rank 0's side of `--tp N`: spawn the N-1 workers, join the group, and the runner that sends
each step's plan to them before running its own shard.

A worker that dies fails rank 0's next collective at once (its sockets close) and is seen by a
watch thread within `WATCH_POLL_S` even when the engine is idle (`TPModelRunner.watch`): the
engine then dies, /health answers 503 and the server exits 3. Rank 0's own end closes the
workers' stdin pipes, which ends them.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

import runtime
from runtime.model.backends import BackendSettings
from runtime.model.batch import ForwardBatch
from runtime.model.config import ModelConfig
from runtime.model.llama import CausalLM
from runtime.model.runner import ModelRunner
from runtime.parallel.group import (
    DTYPES,
    WorkerSpec,
    join_group,
    leave_group,
    open_store,
    rank_device,
)
from runtime.parallel.plan import OP_CONFIG, OP_FORWARD, encode_batch, write_frame
from runtime.parallel.shard import Collectives, ShardSpec, load_shard, shard_forward

log = logging.getLogger("nurserve.tp")
WATCH_POLL_S = 0.1
CLOSE_WAIT_S = 5.0


class WorkerDied(RuntimeError):
    """A tensor-parallel worker exited; the group cannot continue."""


class Workers:
    """The spawned ranks 1..N-1: their stdin carries plans, their stdout says loaded/ready."""

    def __init__(self, procs: list[subprocess.Popen[bytes]]) -> None:
        self.procs = procs
        self._closing = False

    @classmethod
    def spawn(cls, specs: list[WorkerSpec]) -> Workers:
        env = dict(os.environ)
        root = str(Path(runtime.__file__).resolve().parent.parent)  # `runtime` importable
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "runtime.parallel.worker", spec.to_json()],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                bufsize=0,
            )
            for spec in specs
        ]
        log.info("spawned tp workers %s", [p.pid for p in procs])
        return cls(procs)

    def _died(self, rank: int, what: str) -> WorkerDied:
        proc = self.procs[rank - 1]
        try:
            status = proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            status = None
        return WorkerDied(f"tp worker rank {rank} (pid {proc.pid}) {what}; status {status}")

    def expect(self, word: bytes) -> None:
        """Wait until every worker has written the line `word` (raises WorkerDied at EOF)."""
        for rank, proc in enumerate(self.procs, 1):
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != word:
                raise self._died(rank, f"ended before saying {word.decode()!r} (said {line!r})")

    def send(self, op: int, words: Tensor) -> None:
        """The same frame to every worker."""
        for rank, proc in enumerate(self.procs, 1):
            assert proc.stdin is not None
            try:
                write_frame(proc.stdin.fileno(), op, words)
            except OSError as exc:
                raise self._died(rank, f"stopped reading plans ({exc})") from exc

    def watch(self, on_failure: Callable[[BaseException], None]) -> None:
        """Call `on_failure` (from a daemon thread) when a worker exits before `close`."""

        def poll() -> None:
            while not self._closing:
                for rank, proc in enumerate(self.procs, 1):
                    if proc.poll() is not None and not self._closing:
                        on_failure(self._died(rank, "exited"))
                        return
                time.sleep(WATCH_POLL_S)

        threading.Thread(target=poll, name="tp-worker-watch", daemon=True).start()

    def close(self) -> None:
        """End the workers: EOF on their stdin, then SIGKILL whoever lingers."""
        self._closing = True
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        deadline = time.monotonic() + CLOSE_WAIT_S
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@dataclass(eq=False)
class TPGroup:
    """Rank 0's view of the group: its shard, collectives and workers."""

    shard: ShardSpec
    coll: Collectives
    workers: Workers

    def configure(self, capacity_tokens: int) -> None:
        """Tell the workers the KV capacity (rank 0 decides it) and wait until they are ready."""
        self.workers.send(OP_CONFIG, torch.tensor([capacity_tokens], dtype=torch.int64))
        self.workers.expect(b"ready")

    def close(self) -> None:
        """End the workers and leave the group (idempotent)."""
        atexit.unregister(self.workers.close)
        self.workers.close()
        leave_group()


def start_group(
    folder: Path,
    world: int,
    device: torch.device,
    dtype: torch.dtype,
    weights: str,
    settings: BackendSettings,
    num_threads: int | None,
) -> tuple[CausalLM, TPGroup]:
    """Spawn the workers, load rank 0's shard while they load theirs, join the group."""
    shard = ShardSpec.for_rank(ModelConfig.from_dir(folder), 0, world)  # validates --tp
    store = open_store(world)
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    specs = [
        WorkerSpec(
            rank,
            world,
            store.port,
            os.getpid(),
            str(folder),
            str(rank_device(device, rank)),
            dtype_name,
            weights,
            num_threads,
            dict(vars(settings)),
        )
        for rank in range(1, world)
    ]
    workers = Workers.spawn(specs)
    try:
        model = load_shard(folder, dtype, weights, settings, device, shard)
        workers.expect(b"loaded")
        join_group(store, 0, world, device)
    except BaseException:
        workers.close()
        raise
    log.info("tp rank 0/%d: query heads %s, KV heads %s", world, shard.q_heads, shard.kv_heads)
    group = TPGroup(shard, Collectives(shard), workers)
    # at interpreter exit: end the workers, but leave the group to the process's end (after a
    # peer's death, destroying it blocks for seconds)
    atexit.register(workers.close)
    return model, group


@dataclass
class TPModelRunner(ModelRunner):
    """Rank 0's runner: sends each plan to the workers, then runs its shard of the same step;
    the logits are gathered during `run` (every rank takes part), `logits` hands them out."""

    tp: TPGroup | None = None
    _last: tuple[Tensor, Tensor | None] | None = field(default=None, repr=False)

    def _group(self) -> TPGroup:
        assert self.tp is not None, "TPModelRunner without its group"
        return self.tp

    def run(self, batch: ForwardBatch) -> Tensor:
        group = self._group()
        group.workers.send(OP_FORWARD, encode_batch(batch))
        hidden, logits = shard_forward(self.model, self.pool, batch, group.coll)
        self._last = (hidden, logits)
        return hidden  # [B', H]

    def logits(self, hidden: Tensor) -> Tensor:
        last = self._last
        assert last is not None and last[0] is hidden and last[1] is not None
        return last[1]  # [B', V] fp32

    def score(self, batch: ForwardBatch) -> Tensor:
        raise NotImplementedError("reward models are not served with --tp > 1")

    def watch(self, on_failure: Callable[[BaseException], None]) -> None:
        self._group().workers.watch(on_failure)

    def close(self) -> None:
        self._group().close()
