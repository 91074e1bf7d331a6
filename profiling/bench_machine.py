"""bench_serving's machine side: machine info, /proc sampling and the quietness check."""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
from typing import Any

import httpx
import trio

DEFAULT_QUIET_THRESHOLD = 0.08  # cores; the gate of the published peer figures


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def machine_info() -> dict[str, Any]:
    """CPU count/model, memory, load average, versions."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "httpx": httpx.__version__,
        "trio": trio.__version__,
        "cpu_count": os.cpu_count(),
    }
    with contextlib.suppress(AttributeError, OSError):
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError):
        for line in _read("/proc/cpuinfo").splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in _read("/proc/meminfo").splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
    with contextlib.suppress(OSError):
        info["loadavg"] = list(os.getloadavg())
    return info


def _ticks_per_s() -> float:
    try:
        return float(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100.0


# (pid, starttime) -> (comm, ppid, own ticks, waited-for children's ticks)
ProcSample = dict[tuple[int, int], tuple[str, int, int, int]]


def sample_procs() -> ProcSample:
    """utime+stime (and cutime+cstime) of every visible process, from /proc/<pid>/stat."""
    out: ProcSample = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            raw = _read(f"/proc/{name}/stat")
        except OSError:
            continue
        lp, rp = raw.find("("), raw.rfind(")")
        f = raw[rp + 2 :].split()
        try:
            own = int(f[11]) + int(f[12])
            children = int(f[13]) + int(f[14])
            out[(int(name), int(f[19]))] = (raw[lp + 1 : rp], int(f[1]), own, children)
        except (IndexError, ValueError):
            continue
    return out


def sample_stat() -> tuple[int, int]:
    """(busy ticks, steal ticks) of the whole machine from /proc/stat."""
    f = [int(x) for x in _read("/proc/stat").split("\n", 1)[0].split()[1:]]
    f += [0] * (10 - len(f))
    user, nice, system, _idle, _iowait, irq, softirq, steal = f[:8]
    return user + nice + system + irq + softirq, steal


def _descendants(sample: ProcSample, roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for (pid, _st), (_c, ppid, _o, _ch) in sample.items():
        children.setdefault(ppid, []).append(pid)
    seen, stack = set(), [p for p in roots]
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        stack.extend(children.get(p, ()))
    return seen


def listening_pids(port: int) -> set[int]:
    """Processes holding a TCP socket that listens on `port` (Linux /proc; empty elsewhere)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = _read(table).splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{f[9]}]")
    pids: set[int] = set()
    if not inodes:
        return pids
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{name}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{name}/fd/{fd}") in inodes:
                        pids.add(int(name))
                        break
    return pids


class CpuMonitor:
    """Samples /proc once a second in a thread: CPU of others vs. this client + the server.

    Other load = the machine's busy time (/proc/stat: user, nice, system, irq, softirq) minus the
    CPU time of this process, the server processes and their descendants. It so includes
    short-lived processes and kernel work; `top_others` names the visible processes behind it.
    """

    def __init__(self, server_pids: set[int], threshold: float, interval: float = 1.0) -> None:
        self.roots = {os.getpid(), *server_pids}
        self.threshold = threshold
        self.interval = interval
        self.available = os.path.isdir("/proc") and os.path.exists("/proc/stat")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.elapsed = 0.0
        self.ours_ticks = 0
        self.other_ticks = 0
        self.busy_ticks = 0
        self.steal_ticks = 0
        self.max_other_cores = 0.0
        self.by_name: dict[str, int] = {}

    def __enter__(self) -> CpuMonitor:
        if self.available:
            self._prev = (time.monotonic(), sample_procs(), sample_stat())
            self._thread = threading.Thread(target=self._run, name="cpu-monitor", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._take()  # the last partial interval

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def _take(self) -> None:
        t1, procs1, stat1 = time.monotonic(), sample_procs(), sample_stat()
        t0, procs0, stat0 = self._prev
        ours = _descendants(procs1, self.roots) | _descendants(procs0, self.roots)
        dt_ours = 0
        for key, (comm, _ppid, own, ch) in procs1.items():
            old = procs0.get(key)
            if key[0] in ours:  # children reaped by our processes count as ours
                dt_ours += max(0, own + ch - ((old[2] + old[3]) if old else 0))
                continue
            delta = own - (old[2] if old else 0)  # own time only: reaped children would count twice
            if delta > 0:
                label = f"{comm}({key[0]})"
                self.by_name[label] = self.by_name.get(label, 0) + delta
        busy = max(0, stat1[0] - stat0[0])
        dt_other = max(0, busy - dt_ours)  # everything the machine did that was not us
        dt = t1 - t0
        self.elapsed += dt
        self.ours_ticks += dt_ours
        self.other_ticks += dt_other
        self.busy_ticks += busy
        self.steal_ticks += max(0, stat1[1] - stat0[1])
        if dt > 0.5:
            self.max_other_cores = max(self.max_other_cores, dt_other / _ticks_per_s() / dt)
        self._prev = (t1, procs1, stat1)

    def summary(self) -> dict[str, Any]:
        """Mean CPU (in cores) of others, of us, of the machine; quiet = others < threshold."""
        if not self.available or self.elapsed <= 0:
            return {"quiet": None, "line": "quiet: unknown (no /proc)", "threshold": self.threshold}
        hz = _ticks_per_s()
        per = hz * self.elapsed
        other = self.other_ticks / per
        top = sorted(self.by_name.items(), key=lambda kv: -kv[1])[:5]
        quiet = other < self.threshold
        return {
            "quiet": quiet,
            "line": (
                f"quiet: {'yes' if quiet else 'no'} (other load {other:.2f} cores, "
                f"threshold {self.threshold:.2f})"
            ),
            "threshold": self.threshold,
            "other_load_cores": other,
            "other_load_max_1s_cores": self.max_other_cores,
            "ours_cores": self.ours_ticks / per,
            "machine_busy_cores": self.busy_ticks / per,
            "steal_cores": self.steal_ticks / per,
            "sampled_s": self.elapsed,
            "top_others": [f"{name} {ticks / per:.2f}" for name, ticks in top if ticks > 0],
        }


__all__ = [
    "DEFAULT_QUIET_THRESHOLD",
    "CpuMonitor",
    "listening_pids",
    "machine_info",
    "sample_procs",
    "sample_stat",
]
