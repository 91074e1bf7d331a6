"""Start and stop a real server subprocess on a free port, and wait until it is ready; an httpx
client for it, a strict LightLLM SSE parser and the seed request body. For the in-process app
(conftest.py's `make_app`): the test engines' length limit and `serving`, its test client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from quart_trio import QuartTrio

REPO_ROOT = Path(__file__).resolve().parent.parent
SEED_BODY: dict[str, Any] = {
    "inputs": "What is AI?",
    "parameters": {"max_new_tokens": 17, "frequency_penalty": 1},
    "multimodal_params": {},
}
MAX_LEN = 512  # max_req_total_len of the in-process test engines (conftest.py's make_app)

# make_app(deaths=None, **engine_overrides) -> a QuartTrio app on a fresh engine
Factory = Callable[..., "QuartTrio"]


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def hypercorn_command() -> list[str]:
    """The `hypercorn` executable of this interpreter's environment."""
    script = Path(sys.executable).parent / "hypercorn"
    return [str(script)] if script.exists() else [sys.executable, "-m", "hypercorn"]


@dataclass
class ServerProcess:
    """A server subprocess; its stdout+stderr go to a log file."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    _log_file: IO[bytes] = field(repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        """Everything the server printed so far."""
        self._log_file.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send a signal to the server process."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        """Wait for the process to exit; returns its status."""
        return self.proc.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; closes the log. Returns the exit status."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            return self.proc.returncode
        finally:
            if not self._log_file.closed:
                self._log_file.close()
                if not os.environ.get("NURSERVE_KEEP_SERVER_LOGS"):
                    self.log_path.unlink(missing_ok=True)


def start_server(
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    launcher: str = "module",
    ready_timeout_s: float = 600.0,
) -> ServerProcess:
    """Start `python -m server` (launcher "module") or the hypercorn CLI ("hypercorn").

    Waits until `GET /health` answers 200; raises RuntimeError with the server's log when the
    process exits or the timeout passes first.
    """
    port = free_port()
    if launcher == "module":
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), *args]
    elif launcher == "hypercorn":
        cmd = [
            *hypercorn_command(),
            "--worker-class",
            "trio",
            "server.app:create_app()",
            "--bind",
            f"127.0.0.1:{port}",
            *args,
        ]
    else:
        raise ValueError(f"unknown launcher {launcher!r}")
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH", "")) if p
    )
    full_env.setdefault("OMP_NUM_THREADS", "2")
    full_env.update(env or {})
    log_fd, log_name = tempfile.mkstemp(prefix="nurserve-server-", suffix=".log")
    log_file = os.fdopen(log_fd, "wb")
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=full_env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    server = ServerProcess(proc, port, Path(log_name), log_file)
    try:
        wait_ready(server, ready_timeout_s)
    except BaseException:
        server.stop(timeout_s=5)
        raise
    return server


def wait_ready(server: ServerProcess, timeout_s: float) -> None:
    """Poll /health until 200."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with status {server.proc.returncode} before it was ready:\n"
                    + server.log_text()[-5000:]
                )
            try:
                if client.get(server.base_url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout_s} s:\n" + server.log_text()[-5000:])


def client_for(srv: ServerProcess, **kwargs: Any) -> httpx.AsyncClient:
    """An httpx client for `srv` with room for 200 concurrent connections."""
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    return httpx.AsyncClient(base_url=srv.base_url, timeout=120.0, limits=limits, **kwargs)


def parse_sse(raw: bytes) -> list[dict[str, Any]]:
    """Strict LightLLM framing: `data:{json}\\n\\n` frames only, no space, no [DONE]."""
    assert raw.endswith(b"\n\n"), raw[-100:]
    out = []
    for frame in raw.decode("utf-8").split("\n\n")[:-1]:
        assert frame.startswith("data:{"), frame
        out.append(json.loads(frame[5:]))
    return out


async def stream_through_sigterm(
    client: httpx.AsyncClient, srv: ServerProcess, body: dict[str, Any]
) -> list[dict[str, Any]]:
    """Stream `/generate_stream`, send `srv` SIGTERM on the first chunk, return the parsed events
    (a draining server finishes the stream)."""
    chunks: list[bytes] = []
    async with client.stream("POST", "/generate_stream", json=body) as r:
        async for chunk in r.aiter_raw():
            if not chunks:
                srv.signal(signal.SIGTERM)
            chunks.append(chunk)
    return parse_sse(b"".join(chunks))


@asynccontextmanager
async def serving(app: QuartTrio) -> AsyncIterator[Any]:
    """Run the app's startup/shutdown around a test client."""
    async with app.test_app() as test_app:
        yield test_app.test_client()
