"""profiling/stress.py at a small size: every scenario (a)-(g) against real servers.

The full size (10,000 fuzz requests, a 20-minute soak, ...) runs by hand; its figures are in
profiling/README.md. Here the non-readers of (d) get a short --stream_stall_s so that each is
aborted within the run, and (d)'s ITL ratio is reported but not asserted: one round of 24-token
streams on a 2-core machine shared with other jobs is within its noise (these VMs drift 15-30 %
within minutes); the full size takes the median of interleaved rounds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "profiling") not in sys.path:
    sys.path.insert(0, str(ROOT / "profiling"))

import stress  # noqa: E402  (profiling/ is not a package)
import stress_fuzz  # noqa: E402

NOT_ASSERTED = {("d", "ITL p50 within 1.3x (median of rounds)")}


def test_fuzz_generator_covers_every_route_and_method() -> None:
    gen = stress_fuzz.FuzzGen(seed=3, max_body_bytes=1000)
    seen = [gen.request() for _ in range(3000)]
    routes = {
        *stress_fuzz.GEN_ROUTES,
        *stress_fuzz.OPENAI_ROUTES,
        *stress_fuzz.OTHER_ROUTES,
    }
    assert {p for _, p, _, _ in seen} == routes
    assert {m for m, _, _, _ in seen} == set(stress_fuzz.METHODS)
    bodies = [b for _, _, _, b in seen]
    assert any(len(b) > 1000 for b in bodies)  # over --max_body_bytes
    valid = 0
    for body in bodies:
        try:
            valid += isinstance(json.loads(body), dict)
        except (ValueError, RecursionError):  # malformed, or nested 5000 deep
            pass
    assert 0.2 * len(bodies) < valid < 0.9 * len(bodies)  # both valid and malformed


@pytest.mark.slow
def test_small_run_of_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "stress.json"
    argv = [
        "--size", "small", "--fuzz-requests", "200", "--schema-time-s", "10",
        "--soak-s", "15", "--threads", "1", "--json", str(out),
        "--server-arg=--stream_buffer_events=32", "--server-arg=--socket_send_buffer_bytes=8192",
        "--server-arg=--stream_stall_s=3",
    ]  # fmt: skip
    stress.main(argv)
    doc = json.loads(out.read_text())
    assert [s["scenario"] for s in doc["scenarios"]] == list("abcdefg")
    failed = [
        (s["scenario"], name, s["figures"])
        for s in doc["scenarios"]
        for name, ok in s["checks"].items()
        if not ok and (s["scenario"], name) not in NOT_ASSERTED
    ]
    assert not failed, failed
    fuzz = doc["scenarios"][0]["figures"]
    assert fuzz["requests"] == 200 and fuzz["connections"] < 200  # kept-alive connections
