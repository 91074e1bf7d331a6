"""profiling/bench_serving.py: metric definitions on synthetic timings, SSE parsing on canned
streams, and one tiny real run against `python -m server` on the default model."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
# profiling/ is not a package: its modules import each other by bare name (as compare_peers.py
# imports bench_serving), so the tests import them the same way, one module object each.
if str(ROOT / "profiling") not in sys.path:
    sys.path.insert(0, str(ROOT / "profiling"))

import bench_backends as bb  # noqa: E402
import bench_machine as bmach  # noqa: E402
import bench_metrics as bm  # noqa: E402
import bench_prompts as bp  # noqa: E402
import bench_report as br  # noqa: E402
import bench_serving as bs  # noqa: E402

from tests.server_helpers import free_port  # noqa: E402

# --------------------------------------------------------------------------------------------
# statistics and metric definitions


def test_percentile_matches_numpy_linear() -> None:
    np = pytest.importorskip("numpy")
    rng = random.Random(1)
    for n in (1, 2, 3, 10, 101):
        xs = [rng.uniform(0, 100) for _ in range(n)]
        for p in (0, 1, 50, 90, 99, 100):
            assert bm.percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)))
    assert math.isnan(bm.percentile([], 50))


def test_summarize_in_ms() -> None:
    s = bm.summarize([0.001 * v for v in range(1, 101)])  # 1..100 ms
    assert s["mean"] == pytest.approx(50.5)
    assert s["median"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)
    assert s["p99"] == pytest.approx(99.01)
    assert s["min"] == pytest.approx(1.0) and s["max"] == pytest.approx(100.0)
    assert s["std"] == pytest.approx(math.sqrt((100**2 - 1) / 12))
    assert bm.summarize([]) == dict.fromkeys(bm.STAT_KEYS)


def test_tpot_excludes_the_first_token() -> None:
    r = bm.RequestResult(0, ok=True, ttft=0.2, e2el=1.2, output_tokens=11)
    assert r.tpot == pytest.approx(0.1)  # (1.2 - 0.2) / (11 - 1)
    assert bm.RequestResult(0, ok=True, ttft=0.2, e2el=0.2, output_tokens=1).tpot is None
    assert bm.RequestResult(0, ok=True, ttft=None, e2el=1.0, output_tokens=5).tpot is None


def _req(i: int, ttft: float, e2el: float, out: int, itl: list[float], prompt: int = 10) -> Any:
    return bm.RequestResult(
        i,
        ok=True,
        ttft=ttft,
        e2el=e2el,
        output_tokens=out,
        prompt_tokens=prompt,
        itl=itl,
        tokens_from_server=True,
    )


def test_compute_metrics_vllm_definitions() -> None:
    results = [
        _req(0, 0.1, 1.1, 11, [0.1] * 10),  # TPOT 100 ms
        _req(1, 0.3, 0.8, 6, [0.05, 0.1, 0.1, 0.1, 0.15]),  # TPOT 100 ms
        _req(2, 0.2, 0.2, 1, []),  # one token: no TPOT sample; TPOT 0 for goodput
        bm.RequestResult(3, ok=False, error="HTTP 503: busy"),
    ]
    m = bm.compute_metrics(results, 2.0, expected_output_len=11, slos={"ttft": 250, "tpot": 100})
    assert (m["num_requests"], m["completed"], m["failed"]) == (4, 3, 1)
    assert m["total_output_tokens"] == 18 and m["total_input_tokens"] == 30
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(9.0)
    assert m["total_token_throughput"] == pytest.approx(24.0)
    assert m["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert m["ttft_ms"]["median"] == pytest.approx(200.0)
    assert m["tpot_ms"]["mean"] == pytest.approx(100.0)  # 2 samples, the 1-token request left out
    itls = [0.1] * 10 + [0.05, 0.1, 0.1, 0.1, 0.15]  # pooled over requests
    assert m["itl_ms"]["mean"] == pytest.approx(1000 * sum(itls) / len(itls))
    assert m["itl_ms"]["max"] == pytest.approx(150.0)
    assert m["e2el_ms"]["median"] == pytest.approx(800.0)
    assert m["output_len_mismatch"] == 2
    assert m["tokens_from_server"] is True
    # goodput: request 0 (ttft 100 <= 250, tpot 100 <= 100) and request 2 (ttft 200, tpot 0);
    # request 1 misses the TTFT SLO; the failed one never counts.
    assert m["good_requests"] == 2
    assert m["goodput"] == pytest.approx(1.0)
    assert m["goodput_slos_ms"] == {"ttft": 250.0, "tpot": 100.0}
    for fam in bm.METRIC_FAMILIES:
        assert set(m[fam]) == set(bm.STAT_KEYS)


def test_goodput_e2el_and_no_slos() -> None:
    results = [_req(0, 0.1, 1.0, 10, [0.1] * 9), _req(1, 0.1, 6.0, 10, [0.6] * 9)]
    m = bm.compute_metrics(results, 4.0, slos={"e2el": 5000})
    assert m["good_requests"] == 1 and m["goodput"] == pytest.approx(0.25)
    m = bm.compute_metrics(results, 4.0)
    assert m["goodput"] is None and m["output_len_mismatch"] is None
    m = bm.compute_metrics([bm.RequestResult(0, error="x")], 1.0)
    assert m["completed"] == 0 and m["ttft_ms"]["median"] is None


def test_parse_goodput() -> None:
    assert bm.parse_goodput(["ttft:500", "tpot:50", "E2EL:5000"]) == {
        "ttft": 500.0,
        "tpot": 50.0,
        "e2el": 5000.0,
    }
    assert bm.parse_goodput(None) == {}
    for bad in ("ttft", "itl:5", "ttft:abc", "tpot:0"):
        with pytest.raises(ValueError):
            bm.parse_goodput([bad])


# --------------------------------------------------------------------------------------------
# prompts


def test_peer_prompt_and_synthetic_prompts() -> None:
    assert bp.synthetic_prompt(7, None).startswith("Request 0007. The following is a report")
    assert bp.synthetic_prompt(7, None).endswith("Write the next part of the report:")
    prompts = [bp.synthetic_prompt(n, 30) for n in range(20)]
    assert len(set(prompts)) == 20  # unique request numbers: no prefix cache helps

    def count(text: str) -> int:  # a fake tokenizer: one token per word
        return len(text.split())

    words = bp.calibrate_words(16, count)
    assert count(bp.synthetic_prompt(1, words)) == 16
    words = bp.calibrate_words(300, count)  # longer than the filler text: it repeats
    assert count(bp.synthetic_prompt(1, words)) == 300


def test_bundled_prompts() -> None:
    prompts = bp.load_jsonl_prompts(bp.BUNDLED_PROMPTS)
    assert len(prompts) >= 50 and len(set(prompts)) == len(prompts)
    args = argparse.Namespace(dataset="bundled", seed=0)
    built, info = bp.build_prompts(args, 120)
    assert len(built) == 120 and len(set(built)) == 120
    assert built[0].startswith("Request 0000. ") and info["dataset"] == "prompts_en.jsonl"


# --------------------------------------------------------------------------------------------
# SSE parsing on canned streams


def _args(**kw: Any) -> argparse.Namespace:
    base = {"output_len": 3, "ignore_eos": True, "temperature": 0.0, "model": None}
    return argparse.Namespace(**{**base, **kw})


def _client(body: bytes, status: int = 200) -> httpx.AsyncClient:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(status, content=body, headers={"content-type": "text/event-stream"})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    client.seen = seen  # type: ignore[attr-defined]
    return client


def _native_event(count: int, text: str, finished: bool) -> bytes:
    ev = {
        "token": {"id": 1, "text": text, "count_output_tokens": count, "prompt_tokens": 9},
        "generated_text": None,
        "finished": finished,
        "finish_reason": "length" if finished else None,
        "details": None,
    }
    return b"data:" + json.dumps(ev).encode() + b"\n\n"


async def test_nurserve_backend_counts_server_tokens() -> None:
    # two events carrying three tokens: the count comes from the server, not the events
    body = _native_event(2, "ab", False) + _native_event(3, "c", True)
    async with _client(body) as client:
        res = bm.RequestResult(0)
        await bb.request_nurserve(client, "http://x/generate_stream", "hi", _args(), res)
        sent = client.seen[0]  # type: ignore[attr-defined]
    assert res.ok and res.error is None
    assert (res.output_tokens, res.prompt_tokens, res.chunks) == (3, 9, 2)
    assert res.tokens_from_server and res.finish_reason == "length"
    assert len(res.itl) == 1 and res.ttft is not None and res.e2el >= res.ttft
    assert sent == {
        "inputs": "hi",
        "parameters": {"max_new_tokens": 3, "ignore_eos": True, "do_sample": False},
    }


async def test_nurserve_backend_failures() -> None:
    async with _client(b'{"error": "busy"}', status=503) as client:
        res = await bs._one(client, "http://x/g", "hi", _args(backend="nurserve"), 0, 0.0)
    assert not res.ok and res.error.startswith("HTTP 503")
    async with _client(_native_event(1, "a", False)) as client:  # cut before `finished`
        res = await bs._one(client, "http://x/g", "hi", _args(backend="nurserve"), 0, 0.0)
    assert not res.ok and "finished" in res.error
    body = _native_event(1, "a", False) + b'data:{"error": {"message": "boom"}}\n\n'
    async with _client(body) as client:
        res = await bs._one(client, "http://x/g", "hi", _args(backend="nurserve"), 0, 0.0)
    assert not res.ok and "boom" in res.error
    body = b"data:not json\n\n" + _native_event(1, "a", True)
    async with _client(body) as client:
        res = await bs._one(client, "http://x/g", "hi", _args(backend="nurserve"), 0, 0.0)
    assert not res.ok and "bad event" in res.error


@pytest.mark.parametrize(
    "closed",
    [
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.ReadError("this socket was already closed"),  # llama-server, seen at C = 8
    ],
)
async def test_request_resent_once_when_a_reused_connection_was_closed(
    closed: httpx.TransportError,
) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise closed
        return httpx.Response(200, content=_native_event(1, "a", True))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        res = await bs._one(client, "http://x/g", "hi", _args(backend="nurserve"), 0, 0.0)
    assert res.ok and res.retries == 1 and calls == 2
    m = bm.compute_metrics([res], 1.0)
    assert m["retried_requests"] == 1 and m["completed"] == 1

    def always(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    async with httpx.AsyncClient(transport=httpx.MockTransport(always)) as client:
        res = await bs._one(client, "http://x/g", "hi", _args(backend="nurserve"), 0, 0.0)
    assert not res.ok and "RemoteProtocolError" in res.error


def _oai(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


async def test_openai_backend_request_and_usage() -> None:
    body = b"".join(
        [
            _oai({"choices": [{"text": "Hel", "finish_reason": None}]}),
            _oai({"choices": [{"text": "", "finish_reason": None}]}),  # no text: not a token
            _oai({"choices": [{"text": "lo", "finish_reason": None}]}),
            _oai({"choices": [{"text": "", "finish_reason": "length"}]}),
            _oai({"choices": [], "usage": {"prompt_tokens": 65, "completion_tokens": 3}}),
            _oai(b"[DONE]"),
        ]
    )
    async with _client(body) as client:
        res = bm.RequestResult(0)
        await bb.request_openai(client, "http://x/v1/completions", "P", _args(), res)
        sent = client.seen[0]  # type: ignore[attr-defined]
    assert res.ok and (res.output_tokens, res.prompt_tokens, res.chunks) == (3, 65, 2)
    assert res.tokens_from_server and len(res.itl) == 1
    assert sent == {
        "prompt": "P",
        "max_tokens": 3,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
        "cache_prompt": False,
        "stream_options": {"include_usage": True},
    }


async def test_openai_backend_llama_timings_and_fallback() -> None:
    body = _oai(
        {
            "choices": [{"text": "a", "finish_reason": "length"}],
            "timings": {"predicted_n": 5, "prompt_n": 7},
        }
    )
    async with _client(body) as client:
        res = bm.RequestResult(0)
        await bb.request_openai(client, "http://x", "P", _args(), res)
    assert res.ok and (res.output_tokens, res.prompt_tokens) == (5, 7) and res.tokens_from_server
    body = _oai({"choices": [{"text": "a", "finish_reason": None}]}) + _oai(b"[DONE]")
    async with _client(body) as client:
        res = bm.RequestResult(0)
        await bb.request_openai(client, "http://x", "P", _args(), res)
    assert res.ok and res.output_tokens == 1 and not res.tokens_from_server


async def test_run_level_closed_and_open_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import trio

    active = peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await trio.sleep(0.02)
        active -= 1
        body = b"".join(_native_event(i, "x", i == 3) for i in (1, 2, 3))
        return httpx.Response(200, content=body)

    monkeypatch.setattr(
        bs, "_client", lambda args, n: httpx.AsyncClient(transport=httpx.MockTransport(handler))
    )
    args = _args(backend="nurserve", base_url="http://x", endpoint=None, seed=0, burstiness=1.0)
    prompts = [f"p{i}" for i in range(10)]
    results, duration, observed = await bs.run_level(
        args, bs.Level(10, concurrency=3), prompts, None
    )
    assert sorted(r.index for r in results) == list(range(10)) and all(r.ok for r in results)
    assert observed == 3 and peak == 3 and duration > 0
    peak = 0
    level = bs.Level(10, request_rate=float("inf"), max_concurrency=4)
    results, _, observed = await bs.run_level(args, level, prompts, None)
    assert len(results) == 10 and all(r.ok for r in results) and peak == 4
    peak = 0
    args.burstiness = 0.5
    results, duration, _ = await bs.run_level(args, bs.Level(5, request_rate=50.0), prompts, None)
    assert len(results) == 5 and all(r.ok for r in results)
    assert [r.output_tokens for r in results] == [3] * 5


# --------------------------------------------------------------------------------------------
# machine info, quietness, plots


def test_machine_info_and_cpu_monitor() -> None:
    info = bmach.machine_info()
    assert info["cpu_count"] >= 1
    with bmach.CpuMonitor(set(), threshold=0.08, interval=0.2) as mon:
        time.sleep(0.5)
    s = mon.summary()
    assert s["line"].startswith("quiet: ")
    if sys.platform.startswith("linux"):
        assert isinstance(s["quiet"], bool)
        assert s["other_load_cores"] >= 0 and s["machine_busy_cores"] >= 0
        assert s["sampled_s"] > 0.4


def test_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs, raw = [], []
    for c in (1, 4):
        results = [_req(i, 0.1 * c, 1.0 * c, 10, [0.1 * c] * 9) for i in range(4)]
        raw.append(results)
        runs.append(
            {
                "level": f"C={c}",
                "concurrency": c,
                "request_rate": None,
                "metrics": bm.compute_metrics(results, 2.0),
            }
        )
    paths = br.make_plots(runs, raw, tmp_path, "test")
    assert [Path(p).name for p in paths] == [
        "latency_cdf.png",
        "throughput_vs_load.png",
        "ttft_vs_load.png",
    ]
    assert all(Path(p).stat().st_size > 1000 for p in paths)


# --------------------------------------------------------------------------------------------
# a real server


@pytest.mark.slow
def test_real_server_tiny_load(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 240.0  # the first start converts the default model
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                try:
                    if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "server not healthy in time"
                time.sleep(0.5)
        out = tmp_path / "result.json"
        cmd = [
            sys.executable,
            str(ROOT / "profiling" / "bench_serving.py"),
            "--backend",
            "nurserve",
            "--base-url",
            f"http://127.0.0.1:{port}",
            "--num-prompts",
            "4",
            "--concurrency",
            "2",
            "--input-len",
            "16",
            "--output-len",
            "8",
            "--goodput",
            "ttft:60000",
            "--server-pid",
            str(proc.pid),
            "--no-progress",
            "--result-json",
            str(out),
        ]
        bench = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert bench.returncode == 0, bench.stdout + bench.stderr
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

    result = json.loads(out.read_text())
    assert result["server_pids"] == [proc.pid]
    assert result["machine"]["cpu_count"] >= 1
    assert result["config"]["calibrated_tokens"] <= 16
    assert [w["ok"] for w in result["warmup"]] == [True]
    (run,) = result["runs"]
    assert run["concurrency"] == 2 and run["mode"] == "closed"
    m = run["metrics"]
    assert m["completed"] == 4 and m["failed"] == 0, run["errors"]
    assert m["total_output_tokens"] == 4 * 8  # the server's own counts
    assert m["tokens_from_server"] is True and m["output_len_mismatch"] == 0
    assert 4 * 8 <= m["total_input_tokens"] <= 4 * 16
    for key in (
        "duration_s",
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
        "goodput",
    ):
        assert isinstance(m[key], float) and m[key] > 0, key
    for fam in bm.METRIC_FAMILIES:
        for stat in bm.STAT_KEYS:
            assert isinstance(m[fam][stat], float), (fam, stat)
    assert m["ttft_ms"]["median"] <= m["e2el_ms"]["median"]
    q = run["quiet"]
    assert q["line"].startswith("quiet: ")
    assert "Output token throughput" in bench.stdout
