"""Render deploy/haproxy/haproxy.cfg for N nurserve replicas (stdlib only, no import of ours).

    python deploy/render.py --replica 10.0.0.5:8080 --replica 10.0.0.6:8080 -o haproxy.cfg
    haproxy -c -f haproxy.cfg && haproxy -f haproxy.cfg

A replica is `HOST:PORT` or `NAME=HOST:PORT` (the name shows in HAProxy's stats, its logs and
the `X-Served-By` response header; unnamed replicas are replica1, replica2, ...). Every
`{{placeholder}}` of the template must be filled: a missing or unknown one is an error.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "haproxy" / "haproxy.cfg"
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
NAME = re.compile(r"[A-Za-z0-9_.-]+")


def parse_replica(spec: str, index: int) -> tuple[str, str]:
    """`[NAME=]HOST:PORT` -> (name, "HOST:PORT"); raises ValueError on a malformed spec."""
    name, _, address = spec.rpartition("=")
    name = name or f"replica{index}"
    host, sep, port = address.rpartition(":")
    if not NAME.fullmatch(name):
        raise ValueError(f"replica {spec!r}: the name may hold letters, digits, '_', '.', '-'")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"replica {spec!r}: expected [NAME=]HOST:PORT")
    return name, address


def server_lines(replicas: Sequence[str]) -> str:
    """One HAProxy `server` line per replica (checks come from `default-server`)."""
    if not replicas:
        raise ValueError("at least one --replica is needed")
    parsed = [parse_replica(spec, i) for i, spec in enumerate(replicas, start=1)]
    names = [name for name, _ in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"replica names must be unique: {names}")
    return "\n".join(f"    server {name} {address}" for name, address in parsed)


def render(template: str, values: dict[str, str]) -> str:
    """Fill `{{name}}` placeholders; every placeholder needs a value and every value a use."""
    used = set(PLACEHOLDER.findall(template))
    if missing := sorted(used - values.keys()):
        raise ValueError(f"no value for placeholders {missing}")
    if unused := sorted(values.keys() - used):
        raise ValueError(f"the template has no placeholders {unused}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def build_parser() -> argparse.ArgumentParser:
    """The command line (defaults suit a production balancer; tests shorten the checks)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--replica",
        action="append",
        default=[],
        metavar="[NAME=]HOST:PORT",
        help="a nurserve replica (repeat the flag for each)",
    )
    p.add_argument("--bind", default="0.0.0.0:8000", help="address clients connect to")
    p.add_argument(
        "--stats_bind",
        default="127.0.0.1:8404",
        help="address of HAProxy's /stats page and /metrics exporter",
    )
    p.add_argument(
        "--check_interval_ms",
        type=int,
        default=1000,
        help="interval of the /readiness health checks",
    )
    p.add_argument(
        "--fall", type=int, default=2, help="failed checks in a row that mark a replica down"
    )
    p.add_argument(
        "--rise", type=int, default=2, help="passed checks in a row that bring a replica back"
    )
    p.add_argument(
        "--timeout_stream_s",
        type=int,
        default=600,
        help="client/server inactivity timeout: longer than the longest generation",
    )
    p.add_argument("--template", type=Path, default=TEMPLATE, help="the config template")
    p.add_argument("-o", "--output", type=Path, help="write here (default: stdout)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Render the config; exit status 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("check_interval_ms", "fall", "rise", "timeout_stream_s"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive")
    try:
        values = {
            "servers": server_lines(args.replica),
            "bind": args.bind,
            "stats_bind": args.stats_bind,
            "check_interval_ms": str(args.check_interval_ms),
            "fall": str(args.fall),
            "rise": str(args.rise),
            "timeout_stream_s": str(args.timeout_stream_s),
        }
        text = render(args.template.read_text(), values)
    except ValueError as exc:
        parser.error(str(exc))
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
