#!/usr/bin/env python3
"""Stress harness: real `python -m server` processes pushed where servers break.

    python profiling/stress.py --size full --json stress.json          # all of (a)-(g), ~35 min
    python profiling/stress.py --size small --scenarios a,c,f          # a quick pass (CI size)
    python profiling/stress.py --size small --soak-s 60 --server-arg=--data_type=fp32

Scenarios (each prints its figures and PASS/FAIL checks; the JSON holds everything):
  a  fuzz: generated malformed and weird-but-valid requests over every route and method on
     kept-alive connections (0 5xx, 0 hung, 0 non-JSON error bodies), then schemathesis on
     /openapi.json (stress_fuzz.py)
  b  a burst of --burst-factor x --max_waiting_reqs streams: only 200 (complete) and 503 with
     Retry-After
  c  --drops streams dropped after their first token: requests and KV freed within 1 s
  d  --readers clients that never read beside --normal-streams streams: the normal streams'
     ITL p50 within 1.3x of the same streams alone (median of --reader-rounds interleaved
     rounds); every non-reader aborted
  e  soak: --soak-clients closed-loop clients for --soak-s: RSS growth <= 5 %, 0 failed
     requests, 0 leaked KV slots (stress_load.py)
  f  the engine fails mid-load (--fault_inject_step): streams end with an error event,
     /health 503 within one step, exit status 3
  g  SIGTERM mid-load: in-flight streams finish within --shutdown_grace_s, new requests get
     503, exit status 0 (stress_faults.py)

(a)-(e) share one server; (f) and (g) each start and end their own. All three start at once.
Exit status: 0 when every check of every selected scenario passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from stress_common import Outcome, Server  # noqa: E402  (profiling/ is not a package)
from stress_faults import scenario_engine_fault, scenario_sigterm  # noqa: E402
from stress_fuzz import scenario_fuzz  # noqa: E402
from stress_load import (  # noqa: E402
    scenario_burst,
    scenario_drops,
    scenario_slow_readers,
    scenario_soak,
)

SIZES: dict[str, dict[str, Any]] = {
    "full": dict(
        fuzz_requests=10_000, fuzz_workers=8, schema_examples=30, schema_time_s=300,
        burst_waiting=64, burst_factor=10, burst_len=16, drops=200, drop_wave=15,
        readers=50, normal_streams=8, normal_len=128, reader_len=1000, reader_rounds=3,
        soak_s=1200.0,
        soak_clients=8, fault_streams=8, fault_step=200, term_streams=8, term_len=96,
        grace_s=30.0,
    ),
    "small": dict(
        fuzz_requests=300, fuzz_workers=3, schema_examples=2, schema_time_s=20,
        burst_waiting=12, burst_factor=10, burst_len=4, drops=12, drop_wave=3,
        readers=8, normal_streams=2, normal_len=24, reader_len=1000, reader_rounds=1,
        soak_s=20.0,
        soak_clients=3, fault_streams=3, fault_step=40, term_streams=3, term_len=24,
        grace_s=15.0,
    ),
}  # fmt: skip
MAIN_SCENARIOS = "abcde"
MAX_BODY_BYTES = 262_144


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--scenarios", default="abcdefg", help="letters of the scenarios to run")
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="preset sizes")
    for name, value in SIZES["full"].items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=type(value), default=None, help=f"full size: {value}")
    p.add_argument("--capacity", type=int, default=32768, help="--max_total_token_num")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the servers")
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for every server")
    p.add_argument("--json", type=Path, help="write every figure here")
    return p


def sizes(args: argparse.Namespace) -> dict[str, Any]:
    """The preset of --size with the explicit overrides applied."""
    out = dict(SIZES[args.size])
    for name in out:
        if getattr(args, name) is not None:
            out[name] = getattr(args, name)
    return out


def start_servers(args: argparse.Namespace, sz: dict[str, Any]) -> dict[str, Server]:
    """The servers the selected scenarios need, started together (waited for later)."""
    common = ["--max_total_token_num", str(args.capacity), "--max_req_total_len", "1024"]
    common += args.server_arg
    servers: dict[str, Server] = {}
    if set(args.scenarios) & set(MAIN_SCENARIOS):
        main = ["--max_waiting_reqs", str(sz["burst_waiting"])]
        main += ["--max_body_bytes", str(MAX_BODY_BYTES)]
        servers["main"] = Server([*common, *main], args.threads)
    if "f" in args.scenarios:
        fault = ["--fault_inject_step", str(sz["fault_step"])]
        servers["f"] = Server([*common, *fault], args.threads)
    if "g" in args.scenarios:
        grace = ["--shutdown_grace_s", str(sz["grace_s"])]
        servers["g"] = Server([*common, *grace], args.threads)
    return servers


async def run_selected(
    args: argparse.Namespace, sz: dict[str, Any], servers: dict[str, Server]
) -> list[Outcome]:
    """Run the selected scenarios in order a..g."""
    out: list[Outcome] = []
    cap = args.capacity
    for letter in sorted(set(args.scenarios)):
        srv = servers["main" if letter in MAIN_SCENARIOS else letter]
        await trio.to_thread.run_sync(srv.wait_ready)
        started = time.monotonic()
        if letter == "a":
            res = await scenario_fuzz(
                srv.port, srv.url, requests=sz["fuzz_requests"], workers=sz["fuzz_workers"],
                max_body_bytes=MAX_BODY_BYTES, schema_examples=sz["schema_examples"],
                schema_time_s=sz["schema_time_s"],
            )  # fmt: skip
        elif letter == "b":
            res = await scenario_burst(
                srv, waiting=sz["burst_waiting"], factor=sz["burst_factor"],
                output_len=sz["burst_len"],
            )  # fmt: skip
        elif letter == "c":
            res = await scenario_drops(srv, capacity=cap, total=sz["drops"], wave=sz["drop_wave"])
        elif letter == "d":
            res = await scenario_slow_readers(
                srv, capacity=cap, readers=sz["readers"], streams=sz["normal_streams"],
                output_len=sz["normal_len"], reader_len=sz["reader_len"],
                rounds=sz["reader_rounds"],
            )  # fmt: skip
        elif letter == "e":
            res = await scenario_soak(
                srv, capacity=cap, duration_s=sz["soak_s"], clients=sz["soak_clients"]
            )
        elif letter == "f":
            res = await scenario_engine_fault(
                srv, streams=sz["fault_streams"], fault_step=sz["fault_step"]
            )
        else:
            res = await scenario_sigterm(
                srv, streams=sz["term_streams"], output_len=sz["term_len"], grace_s=sz["grace_s"]
            )
        res.figures["scenario_seconds"] = round(time.monotonic() - started, 1)
        print(format_outcome(res), flush=True)
        out.append(res)
    return out


def format_outcome(res: Outcome) -> str:
    """One scenario as a block of the figures table."""
    lines = [f"({res.scenario}) {res.title}: {'PASS' if res.passed else 'FAIL'}"]
    for key, value in res.figures.items():
        if key == "examples" and not value:
            continue
        text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
        lines.append(f"    {key:<40} {text[:300]}")
    for name, ok in res.checks.items():
        lines.append(f"    [{'ok' if ok else 'FAILED'}] {name}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = set(args.scenarios) - set("abcdefg")
    if unknown:
        raise SystemExit(f"unknown scenarios {sorted(unknown)}")
    sz = sizes(args)
    servers = start_servers(args, sz)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        outcomes = trio.run(run_selected, args, sz, servers)
    finally:
        logs = {k: s.log_tail(3000) for k, s in servers.items() if s.proc.poll() not in (0, 3)}
        for srv in servers.values():
            srv.stop()
    ok = all(o.passed for o in outcomes)
    print(f"\nstress: {sum(o.passed for o in outcomes)}/{len(outcomes)} scenarios passed")
    if args.json:
        doc = {"started": started, "size": args.size, "sizes": sz, "server_args": args.server_arg}
        doc |= {"passed": ok, "scenarios": [o.as_dict() for o in outcomes]}
        if not ok:
            doc["server_logs"] = logs
        args.json.write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
