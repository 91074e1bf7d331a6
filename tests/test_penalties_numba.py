"""The Numba penalty kernel under numba's CUDA simulator (tiny arrays: it is ~1e5x slower)."""

from __future__ import annotations

import os

# Must be set before numba is imported anywhere (tox sets it for the whole run too).
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cuda import penalties, penalties_numba  # noqa: E402

numba = pytest.importorskip("numba")
from numba import cuda as numba_cuda  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (numba.config.ENABLE_CUDASIM or numba_cuda.is_available()),
    reason="numba was imported without the CUDA simulator and there is no GPU",
)

Arrays = dict[str, np.ndarray]


def make_inputs(rows: list[dict[int, int]], seed: int, v: int = 50) -> Arrays:
    rng = np.random.default_rng(seed)
    b = len(rows)
    return {
        "logits": (rng.normal(size=(b, v)) * 3).astype(np.float32),
        "token_ids": np.array([t for r in rows for t in r], np.int64),
        "counts": np.array([c for r in rows for c in r.values()], np.int32),
        "row_ptr": np.cumsum([0] + [len(r) for r in rows]).astype(np.int64),
        "repetition": rng.uniform(0.5, 2.0, b).astype(np.float32),
        "frequency": rng.uniform(-2, 2, b).astype(np.float32),
        "presence": rng.uniform(-2, 2, b).astype(np.float32),
        "eos_ids": np.array([0, 9], np.int64),
        "generated_len": np.array([0, 6, 12][:b], np.int64),
        "min_new_tokens": np.array([3, 1, 20][:b], np.int64),
        "decay_start": np.array([0, 2, 4][:b], np.int64),
        "decay_factor": np.array([1.2, 1.1, 1.0][:b], np.float32),
    }


def reference(a: Arrays) -> np.ndarray:
    """Loop-per-row float64 reference of spec §4 steps 1-2."""
    out = a["logits"].astype(np.float64)
    for r in range(out.shape[0]):
        for i in range(a["row_ptr"][r], a["row_ptr"][r + 1]):
            tok, c = a["token_ids"][i], a["counts"][i]
            if c > 0:
                x = out[r, tok]
                x = x / a["repetition"][r] if x > 0 else x * a["repetition"][r]
                out[r, tok] = x - c * a["frequency"][r] - a["presence"][r]
        g = a["generated_len"][r]
        k = max(g - a["decay_start"][r], 0)
        for e in a["eos_ids"]:
            out[r, e] += abs(out[r, e]) * (float(a["decay_factor"][r]) ** k - 1)
            if g < a["min_new_tokens"][r] - 1:
                out[r, e] = -1e7
    return out


def run_kernel(a: Arrays, threads: int) -> np.ndarray:
    logits = a["logits"].copy()
    rest = {k: v for k, v in a.items() if k != "logits"}
    penalties_numba.apply_penalties_numpy_(logits, **rest, threads=threads)
    return logits


def run_twin(a: Arrays) -> np.ndarray:
    t = {k: torch.from_numpy(v.copy()) for k, v in a.items()}
    penalties.apply_penalties_(**t)
    return t["logits"].numpy()


ROWS = [
    {3: 1, 9: 2, 17: 4, 40: 0},  # EOS 9 penalised too; a zero count is a no-op
    {},
    {0: 1, 5: 3, 6: 1, 7: 2, 8: 1, 30: 5, 49: 1, 1: 2, 2: 1, 11: 1, 12: 2},  # > threads entries
]


@pytest.mark.parametrize("threads", [1, 4])
def test_kernel_matches_reference_and_twin(threads: int) -> None:
    a = make_inputs(ROWS, seed=0)
    got = run_kernel(a, threads)
    np.testing.assert_allclose(got, reference(a), rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(got, run_twin(a))  # same fp32 operation order: bit-identical
    assert got[0, 0] == -1e7 and got[0, 9] == -1e7  # g=0 < min_new_tokens-1=2


def test_kernel_empty_csr_and_no_eos() -> None:
    a = make_inputs([{}, {}], seed=1)
    a["eos_ids"] = np.zeros(0, np.int64)
    np.testing.assert_array_equal(run_kernel(a, 4), a["logits"])
    a = make_inputs([{}, {}], seed=2)  # EOS shaping only
    np.testing.assert_allclose(run_kernel(a, 2), reference(a), rtol=1e-6, atol=1e-5)


def test_module_imports_without_cuda() -> None:
    assert penalties_numba.available() in (True, False)
    if numba.config.ENABLE_CUDASIM:
        assert not penalties_numba.available()  # the simulator cannot take torch CUDA tensors
