"""The wire format rank 0 sends its workers: length-prefixed frames of int64 words over each
worker's stdin pipe.

A pipe, not a collective, carries the plan: an idle worker waits in `read` with no timeout to
outlive, and the end of rank 0 (exit, crash, `kill -9`) is an EOF there. A frame is a header
`(op, n)` and `n` int64 words; `OP_FORWARD` packs one `ForwardBatch`.
"""

from __future__ import annotations

import os
import struct

import torch
from torch import Tensor

from runtime.model.batch import ForwardBatch

OP_CONFIG = 1  # payload: [kv capacity tokens]
OP_FORWARD = 2  # payload: a packed ForwardBatch
_HEADER = struct.Struct("<qq")  # op, number of int64 words that follow


def encode_batch(batch: ForwardBatch) -> Tensor:
    """`batch` as one int64 vector: `[T, B, L, R]`, then ids, positions, out slots, the
    block table, seq lens, query lens and the logits rows."""
    t = batch.input_ids.shape[0]
    b, l_max = batch.block_table.shape
    r = batch.logits_index.shape[0]
    parts = [
        torch.tensor([t, b, l_max, r], dtype=torch.int64),
        batch.input_ids,
        batch.positions,
        batch.out_slots,
        batch.block_table.reshape(-1),
        batch.seq_lens,
        torch.tensor(batch.query_lens, dtype=torch.int64),
        batch.logits_index,
    ]
    return torch.cat([p.to("cpu", torch.int64) for p in parts])


def decode_batch(words: Tensor, device: torch.device) -> ForwardBatch:
    """The inverse of `encode_batch`, its tensors on `device`."""
    t, b, l_max, r = (int(v) for v in words[:4])
    sizes = [t, t, t, b * l_max, b, b, r]
    ids, pos, slots, table, seq_lens, q_lens, rows = words[4:].split(sizes)
    dev = [x.to(device) for x in (ids, pos, slots, table.view(b, l_max), seq_lens, rows)]
    return ForwardBatch(dev[0], dev[1], dev[2], dev[3], dev[4], q_lens.tolist(), dev[5])


def write_frame(fd: int, op: int, words: Tensor) -> None:
    """Write one frame to file descriptor `fd` (raises BrokenPipeError once the reader died)."""
    data = _HEADER.pack(op, words.numel()) + words.numpy().tobytes()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, n: int) -> bytes | None:
    """`n` bytes from `fd`, or None at EOF before the first byte."""
    chunks: list[bytes] = []
    left = n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            if left == n:
                return None
            raise EOFError(f"pipe closed inside a frame ({n - left} of {n} bytes)")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> tuple[int, Tensor] | None:
    """The next frame `(op, int64 words)` from `fd`; None at EOF (rank 0 is gone)."""
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    op, n = _HEADER.unpack(header)
    payload = _read_exact(fd, 8 * n) if n else b""
    if payload is None:
        raise EOFError("pipe closed after a frame header")
    words = torch.frombuffer(bytearray(payload), dtype=torch.int64) if n else torch.empty(0)
    return op, words.to(torch.int64)
