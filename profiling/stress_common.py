"""What the stress scenarios share: a `python -m server` subprocess, a raw h11 client over Trio
(so that keep-alive, bodies and timing are exactly what the harness sends), /metrics and
/token_load readers, SSE timing, and the `Outcome` every scenario returns.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Outcome:
    """One scenario's figures and pass/fail checks (`passed` = every check holds)."""

    scenario: str
    title: str
    figures: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(self.checks.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "title": self.title,
            "passed": self.passed,
            "figures": self.figures,
            "checks": self.checks,
        }


class Server:
    """A `python -m server` subprocess on a free port; output goes to a temporary log file."""

    def __init__(self, args: Sequence[str], threads: int = 2) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
        self.args = list(args)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        fd, name = tempfile.mkstemp(prefix="nurserve-stress-", suffix=".log")
        self.log_path = Path(name)
        self._log = os.fdopen(fd, "wb")
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*cmd, *self.args],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Poll /health until 200; RuntimeError with the log's tail if the process exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def rss_bytes(self) -> int:
        """Resident set size of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, SIGKILL after `timeout_s`; removes the log. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if not self._log.closed:
            self._log.close()
            if not os.environ.get("NURSERVE_KEEP_SERVER_LOGS"):
                self.log_path.unlink(missing_ok=True)
        return self.proc.returncode


@dataclass
class Reply:
    """One raw HTTP answer."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes
    closes: bool  # the server ends the connection after it


class RawClient:
    """One kept-alive HTTP/1.1 connection spoken with h11; reconnects when the server closes."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stream: trio.SocketStream | None = None
        self.conn = h11.Connection(h11.CLIENT)
        self.connects = 0

    async def request(
        self, method: str, target: str, body: bytes, headers: Sequence[tuple[str, str]] = ()
    ) -> Reply:
        """Send one request (Content-Length framed) and read its whole answer."""
        if self.stream is None or self.conn.our_state is not h11.IDLE:
            await self.close()
            self.stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            self.conn = h11.Connection(h11.CLIENT)
            self.connects += 1
        hdrs = [("Host", "stress"), ("Content-Length", str(len(body))), *headers]
        out = self.conn.send(h11.Request(method=method, target=target, headers=hdrs))
        out += self.conn.send(h11.Data(data=body)) if body else b""
        out += self.conn.send(h11.EndOfMessage()) or b""
        try:
            await self.stream.send_all(out)
        except trio.BrokenResourceError:
            pass  # the server answered early and closed (e.g. 413): read what it said
        return await self._read_reply()

    async def _read_reply(self) -> Reply:
        assert self.stream is not None
        status, got, parts = 0, {}, []
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(65536)
                self.conn.receive_data(data)  # b"" = EOF: h11 raises if the answer is cut
            elif isinstance(event, h11.Response):
                status, got = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                closes = self.conn.our_state is h11.MUST_CLOSE or (
                    self.conn.their_state is h11.MUST_CLOSE
                )
                if not closes:
                    self.conn.start_next_cycle()
                return Reply(status, got, b"".join(parts), closes)

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None


def read_metrics(url: str) -> dict[str, float]:
    """Unlabelled samples of /metrics, by name."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            out[name] = float(value)
    return out


def kv_in_use(url: str, capacity_tokens: int) -> dict[str, float]:
    """Requests still held and KV slots in use (the prefix cache's unheld slots count as free,
    so an idle server must show 0: anything else is a leak)."""
    m = read_metrics(url)
    return {
        "in_flight": m.get("nurserve_requests_in_flight", 0.0),
        "running": m.get("nurserve_num_requests_running", 0.0),
        "waiting": m.get("nurserve_num_requests_waiting", 0.0),
        "slots_used": round(m.get("nurserve_kv_current_load", 0.0) * capacity_tokens),
        "cached_tokens": m.get("nurserve_prefix_cache_tokens", 0.0),
    }


def stream_body(prompt: str, max_new_tokens: int) -> dict[str, Any]:
    """A greedy /generate_stream body of exactly `max_new_tokens` tokens."""
    return {
        "inputs": prompt,
        "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos": True, "do_sample": False},
    }


@dataclass
class StreamResult:
    """A /generate_stream as the client saw it."""

    status: int
    event_times_s: list[float] = field(default_factory=list)  # monotonic arrival of each event
    last_event: dict[str, Any] | None = None
    retry_after: str | None = None
    error: str | None = None

    @property
    def complete(self) -> bool:
        last = self.last_event or {}
        return self.status == 200 and bool(last.get("finished")) and "error" not in last

    def gaps_s(self) -> list[float]:
        t = self.event_times_s
        return [b - a for a, b in zip(t, t[1:], strict=False)]


async def run_stream(
    client: httpx.AsyncClient, body: dict[str, Any], path: str = "/generate_stream"
) -> StreamResult:
    """Stream one request to its end, timing every event."""
    try:
        async with client.stream("POST", path, json=body) as r:
            res = StreamResult(r.status_code, retry_after=r.headers.get("retry-after"))
            if r.status_code != 200:
                await r.aread()
                return res
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    res.event_times_s.append(time.monotonic())
                    res.last_event = json.loads(line[5:])
            return res
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return StreamResult(0, error=f"{type(exc).__name__}: {exc}")


def pct(values: Sequence[float], p: float) -> float:
    """The p-th percentile (linear interpolation; NaN when empty)."""
    xs = sorted(values)
    if not xs:
        return math.nan
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def client(url: str, timeout_s: float = 120.0) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    return httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits)
