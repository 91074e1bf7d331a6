"""The one thread all of a model's work runs on: loading, then every step.

OpenMP (Numba's `omp` layer, and torch's own libgomp) keeps a pool of worker threads per
calling thread, and libgomp throttles its workers' spin-wait to ~1,000 spins once it manages
more threads than there are CPUs. Steps on `trio.to_thread`'s cached workers (a load on one,
steps on another, any of them kept alive for seconds) leave several pools behind, so every
parallel kernel call then waits for a sleeping worker to wake: a 3072x576 int16 GEMV takes
146 us called from a second thread against 62 us from the only one (profiling/README.md,
session 9). One long-lived thread keeps one pool per runtime.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import TypeVar

import outcome
import trio

T = TypeVar("T")


class ModelThread:
    """A daemon thread that runs submitted calls in order; `run` awaits one from Trio."""

    def __init__(self, name: str = "nurserve-model") -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` on the model thread. Like `trio.to_thread.run_sync`, a cancelled caller
        still waits for the call to end (a step is never abandoned half-done)."""
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def job() -> None:
            result = outcome.capture(fn)
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        self._jobs.put(job)

        def abort(_: object) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def close(self) -> None:
        """Let the thread end after the calls already submitted."""
        self._jobs.put(None)
