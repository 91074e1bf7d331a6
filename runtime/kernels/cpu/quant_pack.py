"""q4_0 / q4_1 / q8_0 weights repacked into the lane layout of `quant_lanes` at load.

The same quantized values and scales as the GGUF blocks (q4_0's offset of 8 becomes a min of
-8 d, exact in fp32), reordered so the GEMV's innermost loop is unit-stride: for a group of
`LANE_ROWS` output rows, byte j of every (row, block) pair is contiguous. Scales are held as
fp32: 24 bytes per q4 block of 32 (the file's 20), 36 per q8_0 block (34).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runtime.kernels.cpu.quant import BLOCK_BYTES, QuantMatrix

LANE_ROWS = 8  # equal to quant_lanes.LANE_ROWS (kept apart: that module is Numba-compiled)
LANE_FORMATS = ("q4_0", "q4_1", "q8_0")


@dataclass(frozen=True)
class LaneMatrix:
    """A `[rows, cols]` weight in lanes: qs `[rows / 8, 16 or 32, blocks * 8]` (uint8 q4 byte
    pairs, or int8 q8 values), d and m `[rows / 8, blocks * 8]` fp32 (value = d q + m); lane
    `8 b + r` is block b of row r of the group."""

    fmt: str
    qs: np.ndarray
    d: np.ndarray
    m: np.ndarray
    rows: int
    cols: int

    @property
    def q8(self) -> bool:
        """int8 values (q8_0), not nibble pairs."""
        return self.fmt == "q8_0"

    @property
    def blocks(self) -> int:
        """32-element blocks per row."""
        return self.cols // 32

    @property
    def nbytes(self) -> int:
        """Bytes held (values and fp32 scales)."""
        return int(self.qs.nbytes + self.d.nbytes + self.m.nbytes)


def can_pack(m: QuantMatrix) -> bool:
    """Whether `m` has a lane layout (its format, and rows in whole groups)."""
    return m.fmt in LANE_FORMATS and m.rows % LANE_ROWS == 0


def _f16(b: np.ndarray) -> np.ndarray:  # [..., 2] uint8 -> [...] fp32
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _to_lanes(a: np.ndarray, n_groups: int, nb: int) -> np.ndarray:
    """Per-(row, block) fields `[rows, nb, *rest]` -> `[groups, *rest, nb * LANE_ROWS]` (lane
    `8 b + r`: block b of row r of the group)."""
    rest = a.shape[2:]
    a = a.reshape(n_groups, LANE_ROWS, nb, *rest)
    a = np.moveaxis(a, (2, 1), (-2, -1))  # [groups, *rest, nb, LANE_ROWS]
    return np.ascontiguousarray(a.reshape(n_groups, *rest, LANE_ROWS * nb))


def pack(m: QuantMatrix) -> LaneMatrix:
    """The lane layout of `m` (see `can_pack`)."""
    if not can_pack(m):
        raise ValueError(f"no lane layout for {m.fmt} [{m.rows}, {m.cols}]")
    nb, n_groups = m.cols // 32, m.rows // LANE_ROWS
    blk = m.data.reshape(m.rows, nb, BLOCK_BYTES[m.fmt])
    d = _f16(blk[:, :, 0:2])  # [rows, nb]
    if m.fmt == "q8_0":
        qs = blk[:, :, 2:34].view(np.int8)  # [rows, nb, 32]
        mins = np.zeros_like(d)
    elif m.fmt == "q4_1":
        qs, mins = blk[:, :, 4:20], _f16(blk[:, :, 2:4])
    else:  # q4_0: d (q - 8) = d q + (-8 d), exact in fp32
        qs, mins = blk[:, :, 2:18], d * np.float32(-8.0)
    return LaneMatrix(
        m.fmt,
        _to_lanes(qs, n_groups, nb),
        _to_lanes(d, n_groups, nb),
        _to_lanes(mins, n_groups, nb),
        m.rows,
        m.cols,
    )


def merge_adjacent(parts: Sequence[QuantMatrix | LaneMatrix]) -> list[QuantMatrix | LaneMatrix]:
    """Runs of adjacent `LaneMatrix` parts of one format as one matrix (their rows stacked):
    q, k and v, or gate and up, in one kernel call. Others are kept as they are."""
    out: list[QuantMatrix | LaneMatrix] = []
    for p in parts:
        last = out[-1] if out else None
        if isinstance(p, LaneMatrix) and isinstance(last, LaneMatrix) and last.fmt == p.fmt:
            out[-1] = LaneMatrix(
                p.fmt,
                np.concatenate([last.qs, p.qs]),
                np.concatenate([last.d, p.d]),
                np.concatenate([last.m, p.m]),
                last.rows + p.rows,
                p.cols,
            )
        else:
            out.append(p)
    return out
