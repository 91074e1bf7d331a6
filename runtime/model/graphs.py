"""CUDA-graph decode runner: (batch, context-length) buckets over one set of static buffers.

Decode batches (one new token per sequence) are padded up to a batch bucket and a context-length
bucket and replayed from a graph captured at start-up. Padding rows are inert: input id 0,
position 0, KV written to `pool.pad_slot`, a block table of pad slots and seq_len 1, so they touch
only the pad slot. Unlike LightLLM (every graph captured at the maximum length), the block table of
a graph is `[bucket, len_bucket]`, so a short batch does not pay attention for the longest context.

On CPU (or with graphs disabled by the caller passing `enabled=True` on a CPU device) "replay" is an
eager call of the model on the same static buffers, which is how CI tests the padding logic.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Sequence

import torch
from torch import Tensor

from runtime.model.batch import ForwardBatch
from runtime.model.kv_pool import KVPool
from runtime.model.llama import CausalLM
from runtime.progress import progress

log = logging.getLogger("nurserve.graphs")

Key = tuple[int, int]  # (batch bucket, context-length bucket)


def capture_buckets(max_batch: int = 256, split: int = 32, step: int = 16) -> list[int]:
    """Batch buckets: every size 1..split, then every `step` below `max_batch`, then `max_batch`."""
    if max_batch < 1 or split < 1 or step < 1:
        raise ValueError("max_batch, split and step must be >= 1")
    sizes = list(range(1, min(split, max_batch) + 1))
    b = split + step
    while b < max_batch:
        sizes.append(b)
        b += step
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def length_buckets(max_len: int, first: int = 256, factor: int = 4) -> list[int]:
    """Context-length buckets: first, first*factor, ... below `max_len`, then `max_len` itself."""
    if max_len < 1 or first < 1 or factor < 2:
        raise ValueError("max_len, first must be >= 1 and factor >= 2")
    sizes: list[int] = []
    n = first
    while n < max_len:
        sizes.append(n)
        n *= factor
    sizes.append(max_len)
    return sizes


def pick_bucket(buckets: Sequence[int], n: int) -> int | None:
    """Smallest bucket >= n (bisect over sorted `buckets`), or None if n exceeds the largest."""
    i = bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


class GraphRunner:
    """Runs decode batches through captured CUDA graphs (or their eager twin on CPU)."""

    def __init__(
        self,
        model: CausalLM,
        pool: KVPool,
        max_batch_size: int = 256,
        max_len_in_batch: int = 4096,
        enabled: bool = True,
        device: torch.device | str | None = None,
        *,
        batch_buckets: Sequence[int] | None = None,
        len_buckets: Sequence[int] | None = None,
        split: int = 32,
        step: int = 16,
        warmup_runs: int = 2,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.pool = pool
        self.device = torch.device(device) if device is not None else pool.k.device
        self.enabled = enabled
        if batch_buckets:
            self.batch_buckets = sorted({int(b) for b in batch_buckets if 0 < b})
        else:
            self.batch_buckets = capture_buckets(max_batch_size, split, step)
        if len_buckets:
            lens = {int(n) for n in len_buckets if 0 < n <= max_len_in_batch} | {max_len_in_batch}
            self.len_buckets = sorted(lens)
        else:
            self.len_buckets = length_buckets(max_len_in_batch)
        self.max_bs = self.batch_buckets[-1]
        self.max_len = self.len_buckets[-1]
        self.warmup_runs = warmup_runs
        self.progress = progress
        self.use_graphs = enabled and self.device.type == "cuda"
        self.graphs: dict[Key, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.capture_seconds = 0.0
        self.graph_replays = 0
        self.eager_fallbacks = 0
        self._ready = False

    # ---- buffers -------------------------------------------------------------------------
    def _alloc(self) -> None:
        bs, n, pad, dev = self.max_bs, self.max_len, self.pool.pad_slot, self.device
        with torch.inference_mode():
            self._ids = torch.zeros(bs, dtype=torch.int64, device=dev)  # [max_bs]
            self._pos = torch.zeros(bs, dtype=torch.int64, device=dev)  # [max_bs]
            self._slots = torch.full((bs,), pad, dtype=torch.int64, device=dev)  # [max_bs]
            self._lens = torch.ones(bs, dtype=torch.int64, device=dev)  # [max_bs]
            self._rows = torch.arange(bs, dtype=torch.int64, device=dev)  # [max_bs]
            # One flat table: the [bs, len] view of a graph is its contiguous prefix.
            self._table = torch.full(
                (bs * n,), pad, dtype=torch.int64, device=dev
            )  # [max_bs * max_len]

    def static_batch(self, bs: int, length: int) -> ForwardBatch:
        """The decode `ForwardBatch` of graph (bs, length): views of the static buffers."""
        return ForwardBatch(
            input_ids=self._ids[:bs],  # [bs]
            positions=self._pos[:bs],  # [bs]
            out_slots=self._slots[:bs],  # [bs]
            block_table=self._table[: bs * length].view(bs, length),  # [bs, length]
            seq_lens=self._lens[:bs],  # [bs]
            query_lens=[1] * bs,
            logits_index=self._rows[:bs],  # [bs]
        )

    def keys(self) -> list[Key]:
        """Every (batch bucket, length bucket), largest first (the capture order)."""
        keys = [(b, n) for b in self.batch_buckets for n in self.len_buckets]
        return sorted(keys, key=lambda k: (k[0] * k[1], k[0]), reverse=True)

    # ---- capture -------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self) -> None:
        """Allocate the static buffers and, on CUDA, capture every graph (largest first)."""
        if not self.enabled:
            return
        self._alloc()
        if not self.use_graphs:
            self._ready = True
            return
        t0 = time.perf_counter()
        mempool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        keys = self.keys()
        for key in progress(keys, "capturing CUDA graphs", "graph", self.progress):
            batch = self.static_batch(*key)  # buffers hold padding: shapes matter, not contents
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(self.warmup_runs):  # lazy init, kernel compiles, cuBLAS workspaces
                    self.model.hidden(batch, self.pool)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool, stream=stream):
                out = self.model.hidden(batch, self.pool)  # [bs, H], graph-owned
            self.graphs[key] = (graph, out)
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - t0
        log.info("captured %d CUDA graphs in %.1f s", len(keys), self.capture_seconds)
        self._ready = True

    # ---- run -----------------------------------------------------------------------------
    def bucket_for(self, batch: ForwardBatch) -> Key | None:
        """The (batch, length) bucket of a decode batch, or None if it does not fit any."""
        bs = pick_bucket(self.batch_buckets, len(batch.query_lens))
        n = pick_bucket(self.len_buckets, int(batch.block_table.shape[1]))
        return None if bs is None or n is None else (bs, n)

    def can_run(self, batch: ForwardBatch) -> bool:
        """True for a non-empty decode-only batch within the largest batch and length buckets."""
        if not (self.enabled and self._ready) or not batch.query_lens or not batch.is_decode:
            return False
        return self.bucket_for(batch) is not None

    def _fill(self, batch: ForwardBatch, bs: int, length: int) -> None:
        """Copy a decode batch of b <= bs rows into the static buffers; pad rows b..bs-1."""
        b, w = len(batch.query_lens), int(batch.block_table.shape[1])
        pad = self.pool.pad_slot
        self._ids[:b].copy_(batch.input_ids, non_blocking=True)
        self._pos[:b].copy_(batch.positions, non_blocking=True)
        self._slots[:b].copy_(batch.out_slots, non_blocking=True)
        self._lens[:b].copy_(batch.seq_lens, non_blocking=True)
        if b < bs:
            self._ids[b:bs].zero_()
            self._pos[b:bs].zero_()
            self._slots[b:bs].fill_(pad)
            self._lens[b:bs].fill_(1)
        table = self._table[: bs * length].view(bs, length)  # [bs, length]
        if w < length:
            table.fill_(pad)
        elif b < bs:
            table[b:].fill_(pad)
        table[:b, :w].copy_(batch.block_table, non_blocking=True)

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> Tensor:
        """Final-normed hidden rows `[B', H]` for `batch.logits_index`, as `CausalLM.hidden` gives.

        Batches that `can_run` rejects run eagerly. The result never aliases graph memory.
        """
        key = self.bucket_for(batch) if self.can_run(batch) else None
        if key is None:
            self.eager_fallbacks += 1
            return self.model.hidden(batch, self.pool)
        b = len(batch.query_lens)
        self._fill(batch, *key)
        if self.use_graphs:
            graph, out = self.graphs[key]
            graph.replay()
        else:
            out = self.model.hidden(self.static_batch(*key), self.pool)  # [bs, H] eager twin
        self.graph_replays += 1
        # index_select copies: the rows leave graph-owned memory before the next replay
        return out[:b].index_select(0, batch.logits_index)  # [B', H]
