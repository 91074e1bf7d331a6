"""bench_serving's output: the text summary of a level and the PNG plots."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_metrics import RequestResult  # noqa: E402  (profiling/ is not a package)


def format_summary(run: dict[str, Any]) -> str:
    """A vLLM-like text block for one level."""
    m = run["metrics"]
    lines = [f"{' ' + run['level'] + ' ':=^60}"]

    def row(label: str, value: Any, fmt: str = "{:.2f}") -> None:
        text = (
            "n/a"
            if value is None or (isinstance(value, float) and math.isnan(value))
            else (fmt.format(value) if isinstance(value, float) else str(value))
        )
        lines.append(f"{label:<44}{text:>16}")

    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    if run.get("max_concurrency_observed") is not None:
        row("Most requests in flight:", run["max_concurrency_observed"])
    row("Benchmark duration (s):", m["duration_s"])
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    row("Request throughput (req/s):", m["request_throughput"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total token throughput (tok/s):", m["total_token_throughput"])
    if m["goodput"] is not None:
        row("Request goodput (req/s):", m["goodput"])
    if m.get("retried_requests"):
        row("Requests resent (connection closed):", m["retried_requests"])
    if m["output_len_mismatch"]:
        row("Requests with another output length:", m["output_len_mismatch"])
    if not m["tokens_from_server"] and m["completed"]:
        lines.append("(token counts from SSE chunks: the server reported none)")
    for fam, title in (
        ("ttft_ms", "Time to First Token"),
        ("tpot_ms", "Time per Output Token (excl. 1st token)"),
        ("itl_ms", "Inter-token Latency"),
        ("e2el_ms", "End-to-end Latency"),
    ):
        lines.append(f"{' ' + title + ' ':-^60}")
        s = m[fam]
        short = fam[:-3].upper()
        for k, name in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            row(f"{name} {short} (ms):", s[k])
    lines.append(run["quiet"]["line"])
    for err in run.get("errors", [])[:3]:
        lines.append(f"error: {err}")
    lines.append("=" * 60)
    return "\n".join(lines)


def make_plots(
    runs: Sequence[dict[str, Any]],
    raw: Sequence[Sequence[RequestResult]],
    plot_dir: Path,
    title: str,
) -> list[str]:
    """latency_cdf.png, and with several levels throughput_vs_load.png + ttft_vs_load.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (fam, label) in zip(
        axes.flat,
        (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency")),
        strict=True,
    ):
        for run, results in zip(runs, raw, strict=True):
            ok = [r for r in results if r.ok]
            if fam == "itl":
                vals = [g for r in ok for g in r.itl]
            else:
                vals = [v for v in (getattr(r, fam) for r in ok) if v is not None]
            if not vals:
                continue
            xs = sorted(v * 1000.0 for v in vals)
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            xs, ys = [xs[0], *xs], [0.0, *ys]  # the curve starts at 0
            ax.step(xs, ys, where="post", label=run["level"])
        ax.set_xlabel(f"{label} (ms)")
        ax.set_ylabel("fraction of samples")
        ax.set_title(f"{label} CDF")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = plot_dir / "latency_cdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))

    if len(runs) > 1:
        open_loop = runs[0]["request_rate"] is not None
        xkey = "request_rate" if open_loop else "concurrency"
        xlabel = "request rate (req/s)" if open_loop else "concurrency"
        xs = [r[xkey] for r in runs]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(xs, [r["metrics"]["output_throughput"] for r in runs], "o-", label="output tok/s")
        ax.plot(
            xs, [r["metrics"]["total_token_throughput"] for r in runs], "s--", label="total tok/s"
        )
        written.append(
            _finish_load_plot(
                fig,
                ax,
                xs,
                xlabel,
                "tokens / s",
                f"Throughput vs {xlabel} — {title}",
                open_loop,
                plot_dir / "throughput_vs_load.png",
            )
        )

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for stat, style in (("median", "o-"), ("p99", "s--")):
            ax.plot(xs, [r["metrics"]["ttft_ms"][stat] for r in runs], style, label=f"TTFT {stat}")
        written.append(
            _finish_load_plot(
                fig,
                ax,
                xs,
                xlabel,
                "TTFT (ms)",
                f"TTFT vs {xlabel} — {title}",
                open_loop,
                plot_dir / "ttft_vs_load.png",
            )
        )
    return written


def _finish_load_plot(
    fig: Any,
    ax: Any,
    xs: list[Any],
    xlabel: str,
    ylabel: str,
    title: str,
    open_loop: bool,
    path: Path,
) -> str:
    """Label, scale (log2 concurrency axis for closed loops), save and close a load plot."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    if not open_loop:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


__all__ = ["format_summary", "make_plots"]
