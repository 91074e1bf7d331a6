"""The real server over TCP: `python -m server` and the hypercorn CLI, talked to with httpx.

One `python -m server` process is shared by the module (its last test SIGTERMs it); the
hypercorn-CLI launch and the engine-death runs, which start their own processes, are in
test_server_launch.py.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import aclosing
from typing import Any

import httpx
import pytest
import trio

from tests.server_helpers import (
    SEED_BODY,
    ServerProcess,
    client_for,
    parse_sse,
    start_server,
    stream_through_sigterm,
)

pytestmark = pytest.mark.slow

MAX_LEN = 512
MAX_BODY_BYTES = 256 * 1024
VOCAB = 49152
EVENT_KEYS = ["token", "generated_text", "finished", "finish_reason", "details"]
TOKEN_KEYS = ["id", "text", "logprob", "special", "count_output_tokens", "prompt_tokens"]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    srv = start_server(
        [
            "--max_total_token_num", "8192",
            "--max_req_total_len", str(MAX_LEN),
            "--running_max_req_size", "128",
            "--max_body_bytes", str(MAX_BODY_BYTES),
            "--shutdown_grace_s", "30",
        ]
    )  # fmt: skip
    yield srv
    srv.stop()


async def stream_events(
    client: httpx.AsyncClient, body: Any, path: str = "/generate_stream"
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    async with client.stream("POST", path, json=body) as r:
        raw = b"".join([chunk async for chunk in r.aiter_raw()])
    return r, parse_sse(raw) if r.status_code == 200 else []


# ------------------------------------------------------------------ routes and seed examples


async def test_every_route(server: ServerProcess) -> None:
    async with client_for(server) as c:
        for path in ("/health", "/healthz"):
            r = await c.get(path)
            assert r.status_code == 200 and r.json() == {"message": "Ok"}
        r = await c.head("/health")
        assert r.status_code == 200
        r = await c.get("/token_load")
        assert list(r.json()) == ["current_load", "logical_max_load", "dynamic_max_load"]
        assert all(isinstance(v, float) for v in r.json().values())
        for method in ("GET", "POST"):
            r = await c.request(method, "/get_model_name")
            assert r.json() == {"model_name": "default_model_name"}
            for path in ("/liveness", "/readiness"):
                r = await c.request(method, path)
                assert r.status_code == 200 and r.json() == {"status": "ok"}
        r = await c.post("/tokens", json={"text": "What is AI?", "parameters": {}})
        assert r.json() == {"ntokens": 4}
        r = await c.request("GET", "/tokens", json={"text": "What is AI?"})
        assert r.json() == {"ntokens": 4}
        short = {"inputs": "What is AI?", "parameters": {"max_new_tokens": 3}}
        r = await c.post("/", json=short)
        assert r.headers["content-type"] == "application/json"
        assert r.json()["count_output_tokens"] == 3
        r, events = await stream_events(c, {**short, "stream": True}, "/")
        assert r.headers["content-type"].startswith("text/event-stream") and len(events) == 3
        r = await c.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert "lightllm_request_success" in r.text


async def test_seed_curl_examples(server: ServerProcess) -> None:
    """The seed's `curl .../generate` and `.../generate_stream` examples."""
    async with client_for(server) as c:
        r = await c.post("/generate", json=SEED_BODY, headers={"Content-Type": "application/json"})
        assert r.status_code == 200
        body = r.json()
        assert list(body) == [
            "generated_text",
            "count_output_tokens",
            "finish_reason",
            "prompt_tokens",
            "cached_tokens",
        ]
        assert isinstance(body["generated_text"], list) and len(body["generated_text"]) == 1
        assert isinstance(body["generated_text"][0], str) and body["generated_text"][0]
        assert body["count_output_tokens"] == 17
        assert body["finish_reason"] == "length"
        assert body["prompt_tokens"] == 4

        r, events = await stream_events(c, SEED_BODY)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert len(events) == 17
        for i, ev in enumerate(events, 1):
            # the last event adds cached_tokens (prompt tokens the prefix cache supplied)
            assert list(ev) == EVENT_KEYS + ["cached_tokens"] * (i == 17)
            assert list(ev["token"]) == TOKEN_KEYS
            tok = ev["token"]
            assert isinstance(tok["id"], int) and 0 <= tok["id"] < VOCAB
            assert isinstance(tok["text"], str) and isinstance(tok["logprob"], float)
            assert tok["logprob"] <= 0.0 and tok["special"] is False
            assert tok["count_output_tokens"] == i and tok["prompt_tokens"] == 4
            assert ev["generated_text"] is None and ev["details"] is None
            assert ev["finished"] is (i == 17)
            assert ev["finish_reason"] == ("length" if i == 17 else None)
        assert "".join(e["token"]["text"] for e in events) == body["generated_text"][0]


async def test_seed_python_get_score_example(server: ServerProcess) -> None:
    """The seed's Python /get_score example: on a causal LM it is a clear 400, not a 417/500."""
    query = (
        "<|im_start|>user\nHello! What's your name?<|im_end|>\n<|im_start|>assistant\n"
        "My name is InternLM2! A helpful AI assistant. What can I do for you?<|im_end|>\n<|reward|>"
    )
    data = {"chat": query, "parameters": {"frequency_penalty": 1}}
    async with client_for(server) as c:
        r = await c.post(
            "/get_score", content=json.dumps(data), headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400
        assert "reward model" in r.json()["message"]


async def test_n_details_and_stop(server: ServerProcess) -> None:
    async with client_for(server) as c:
        body = {
            "inputs": "Once upon a time",
            "parameters": {
                "n": 3,
                "max_new_tokens": 4,
                "do_sample": True,
                "seed": 11,
                "return_details": True,
            },
        }
        r = await c.post("/generate", json=body)
        out = r.json()
        assert r.status_code == 200, out
        assert len(out["generated_text"]) == 3 and out["count_output_tokens"] == [4, 4, 4]
        assert out["finish_reason"] == ["length"] * 3
        assert [len(t) for t in out["tokens"]] == [4, 4, 4]
        for seq, text in zip(out["tokens"], out["generated_text"], strict=True):
            assert "".join(t["text"] for t in seq) == text
        r, events = await stream_events(c, body)
        assert r.status_code == 200
        assert sorted(e["index"] for e in events) == sorted([0, 1, 2] * 4)
        assert sum(e["finished"] for e in events) == 3

        detailed = (
            await c.post(
                "/generate",
                json={
                    **SEED_BODY,
                    "parameters": {**SEED_BODY["parameters"], "return_details": True},
                },
            )
        ).json()
        toks = detailed["tokens"]
        assert len(toks) == 17 and [t["count_output_tokens"] for t in toks] == list(range(1, 18))
        assert toks[-1]["cumlogprob"] == pytest.approx(sum(t["logprob"] for t in toks), rel=1e-5)

        text = detailed["generated_text"][0]
        stop = text.split()[3]
        params = {**SEED_BODY["parameters"], "stop_sequences": [stop]}
        out = (await c.post("/generate", json={**SEED_BODY, "parameters": params})).json()
        assert out["finish_reason"] == "stop" and out["count_output_tokens"] < 17
        assert out["generated_text"][0].endswith(stop) and text.startswith(out["generated_text"][0])
        r, events = await stream_events(c, {**SEED_BODY, "parameters": params})
        assert events[-1]["finish_reason"] == "stop"
        assert "".join(e["token"]["text"] for e in events) == out["generated_text"][0]


# ------------------------------------------------------------------ concurrency


def burst_requests() -> list[dict[str, Any]]:
    """8 distinct greedy requests (some with penalties or token-id prompts)."""
    rng = random.Random(5)
    words = "the cat sat on a mat while the dog ran across green fields under blue sky".split()
    reqs = []
    for i in range(8):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 40)))
        params: dict[str, Any] = {"max_new_tokens": rng.randint(2, 6), "return_details": True}
        if i % 4 == 1:
            params["frequency_penalty"] = 0.5
        if i % 4 == 2:
            params["repetition_penalty"] = 1.2
        inputs: Any = (
            prompt if i % 3 else [rng.randrange(100, 20000) for _ in range(rng.randint(3, 30))]
        )
        reqs.append({"inputs": inputs, "parameters": params})
    return reqs


async def run_one(
    c: httpx.AsyncClient, body: dict[str, Any], stream: bool
) -> tuple[list[int], str, str]:
    """(token ids, text, finish_reason) of one request, streamed or not."""
    if stream:
        params = {k: v for k, v in body["parameters"].items() if k != "return_details"}
        r, events = await stream_events(c, {**body, "parameters": params})
        assert r.status_code == 200
        return (
            [e["token"]["id"] for e in events],
            "".join(e["token"]["text"] for e in events),
            events[-1]["finish_reason"],
        )
    r = await c.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    return [t["id"] for t in out["tokens"]], out["generated_text"][0], out["finish_reason"]


async def test_burst_equals_sequential(server: ServerProcess) -> None:
    """64 concurrent mixed streaming/non-streaming greedy requests = the same run one at a time."""
    reqs = burst_requests()
    async with client_for(server) as c:
        reference = [await run_one(c, body, stream=False) for body in reqs]
        results: dict[int, tuple[list[int], str, str]] = {}

        async def one(k: int) -> None:
            results[k] = await run_one(c, reqs[k % len(reqs)], stream=bool(k % 2))

        async with trio.open_nursery() as nursery:
            for k in range(64):
                nursery.start_soon(one, k)
        for k in range(64):
            assert results[k] == reference[k % len(reqs)], f"request {k} (stream={bool(k % 2)})"
        assert (await c.get("/token_load")).json()["current_load"] == 0.0


def metric(text: str, name: str) -> float:
    """One sample of a Prometheus text body."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


# httpx leaves its inner byte-stream generator to the garbage collector when a stream is
# cancelled mid-read (the client side of this test, not the server); trio reports that as an
# unraisable ResourceWarning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_dropped_streams_are_aborted(server: ServerProcess) -> None:
    """50 streams dropped at random points: every request is aborted at once, the engine's
    load is 0 within 1 s (or, on a CPU too slow for that, by the end of the engine step that
    was running plus the next one), and the server keeps serving."""
    rng = random.Random(7)
    body = {
        "inputs": "Write a very long story about the sea.",
        "parameters": {"max_new_tokens": 400, "ignore_eos": True},
    }
    async with client_for(server) as c:
        text = (await c.get("/metrics")).text
        aborted_before = metric(text, "nurserve_request_aborted")
        accepted_before = metric(text, "lightllm_request_count")

        async def drop(after_events: int, after_s: float) -> None:
            with trio.move_on_after(after_s):
                async with c.stream("POST", "/generate_stream", json=body) as r:
                    assert r.status_code == 200
                    seen = 0
                    async with aclosing(r.aiter_raw()) as chunks:  # closed at once when we leave
                        async for chunk in chunks:
                            seen += chunk.count(b"data:")
                            if seen >= after_events:
                                break

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(drop, rng.randint(1, 4), rng.uniform(0.05, 2.0))
        # Measured in engine steps, not seconds: the aborts must be seen by the HTTP layer and
        # the KV freed within two steps of the last drop, however slow this machine is.
        steps_at_drop = metric((await c.get("/metrics")).text, "nurserve_engine_steps_total")
        with trio.fail_after(60):  # a hang guard only
            while True:
                text = (await c.get("/metrics")).text
                steps = metric(text, "nurserve_engine_steps_total") - steps_at_drop
                http_done = metric(text, "nurserve_requests_in_flight") == 0
                aborted = metric(text, "nurserve_request_aborted") - aborted_before
                accepted = metric(text, "lightllm_request_count") - accepted_before
                # (a client that left before its request reached the engine has nothing to abort)
                if (
                    http_done
                    and aborted >= accepted
                    and metric(text, "nurserve_kv_current_load") == 0
                ):
                    break
                assert steps <= 2, (
                    f"{steps} engine steps after the drops: {accepted} accepted, {aborted} "
                    f"aborted, in flight: {not http_done}"
                )
                await trio.sleep(0.01)
        assert (await c.get("/token_load")).json()["current_load"] == 0.0
        r = await c.post("/generate", json=SEED_BODY)
        assert r.status_code == 200 and r.json()["count_output_tokens"] == 17


# ------------------------------------------------------------------ malformed requests

BIG = b'{"inputs": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}'
# (method, path, raw body or JSON, expected status, a substring the message must contain)
# fmt: off
MALFORMED: list[tuple[str, str, Any, int, str]] = [
    ("GET", "/generate", None, 405, "POST"),
    ("PUT", "/generate", SEED_BODY, 405, "PUT"),
    ("GET", "/generate_stream", None, 405, "POST"),
    ("DELETE", "/health", None, 405, "DELETE"),
    ("POST", "/health", None, 405, "POST"),
    ("POST", "/token_load", None, 405, "GET"),
    ("PATCH", "/tokens", None, 405, "PATCH"),
    ("GET", "/nope", None, 404, "/nope"),
    ("POST", "/v2/chat/completions", {"messages": []}, 404, "/v2/chat/completions"),
    ("GET", "/generate/extra", None, 404, "/generate/extra"),
    ("POST", "/generate", b"", 400, "empty"),
    ("POST", "/generate", b"   ", 400, "empty"),
    ("POST", "/generate", b'{"inputs": "hi"', 400, "JSON"),
    ("POST", "/generate", b"{'inputs': 'hi'}", 400, "JSON"),
    ("POST", "/generate", b'{"inputs": "hi",}', 400, "JSON"),
    ("POST", "/generate", b'{"inputs": Infinity}', 400, "Infinity"),
    ("POST", "/generate", b"\xc3\x28", 400, "UTF-8"),
    ("POST", "/generate", b"[]", 400, "object"),
    ("POST", "/generate", b"null", 400, "object"),
    ("POST", "/generate", b"17", 400, "object"),
    ("POST", "/generate", {"parameters": {}}, 400, "inputs"),
    ("POST", "/generate", {"inputs": ""}, 400, "inputs"),
    ("POST", "/generate", {"inputs": []}, 400, "inputs"),
    ("POST", "/generate", {"inputs": {"text": "hi"}}, 400, "inputs"),
    ("POST", "/generate", {"inputs": [1, 2.5]}, 400, "inputs[1]"),
    ("POST", "/generate", {"inputs": [[1, 2]]}, 400, "inputs[0]"),
    ("POST", "/generate", {"inputs": [-5]}, 400, "vocabulary"),
    ("POST", "/generate", {"inputs": [VOCAB]}, 400, str(VOCAB)),
    ("POST", "/generate", {"inputs": "hi", "parameters": "fast"}, 400, "parameters"),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"temperature": "hot"}}, 400, "temperature"),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"temperature": 0}}, 400, "temperature"),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"top_p": 1.5}}, 400, "top_p"),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"top_k": 1.5}}, 400, "top_k"),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"do_sample": "yes"}}, 400, "do_sample"),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": -1}}, 400, "max_new_tokens"),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": MAX_LEN}}, 400, "max_req_total_len"),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"n": 0}}, 400, "'n'"),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"n": 2, "best_of": 3}}, 400, "best_of"),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"max_tokens": 5}}, 400, "max_tokens"),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"return_details": 1}}, 400, "return_details"),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"stop_sequences": [5]}}, 400, "stop_sequences"),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"presence_penalty": 3}}, 400, "presence_penalty"),
    ("POST", "/generate", {"inputs": "hi", "multimodal_params": {"images": [{"type": "url", "data": "http://x/y.png"}]}}, 400, "no images"),
    ("POST", "/generate", {"inputs": "hi", "multimodal_params": {"audios": [{"type": "base64", "data": "AAAA"}]}}, 400, "no audio"),
    ("POST", "/generate", {"inputs": "hi", "multimodal_params": {"videos": []}}, 400, "videos"),
    ("POST", "/generate", {"inputs": "hi", "multimodal_params": "none"}, 400, "multimodal_params"),
    ("POST", "/generate", {"inputs": "hi", "model": "gpt"}, 400, "model"),
    ("POST", "/generate", BIG, 413, "max_body_bytes"),
    ("POST", "/generate_stream", {"inputs": "hi", "parameters": {"top_p": -1}}, 400, "top_p"),
    ("POST", "/generate_stream", {"inputs": "word " * MAX_LEN}, 400, "max_req_total_len"),
    ("POST", "/generate_stream", {"inputs": [1], "parameters": {"max_new_tokens": MAX_LEN}}, 400, "max_new_tokens"),
    ("POST", "/", {"inputs": "hi", "stream": "yes"}, 400, "stream"),
    ("POST", "/", {"inputs": None, "stream": True}, 400, "inputs"),
    ("POST", "/tokens", {"parameters": {}}, 400, "text"),
    ("POST", "/tokens", {"text": ["a"]}, 400, "text"),
    ("POST", "/get_score", {"chat": "hi"}, 400, "reward model"),
]
# fmt: on


async def test_malformed_requests(server: ServerProcess) -> None:
    assert len(MALFORMED) >= 40
    async with client_for(server) as c:
        for method, path, body, status, needle in MALFORMED:
            kwargs: dict[str, Any] = {"headers": {"Content-Type": "application/json"}}
            if isinstance(body, bytes):
                kwargs["content"] = body
            elif body is not None:
                kwargs["content"] = json.dumps(body).encode()
            r = await c.request(method, path, **kwargs)
            case = f"{method} {path} {str(body)[:80]}"
            assert r.status_code == status, f"{case}: {r.status_code} {r.text[:300]}"
            assert r.headers["content-type"] == "application/json", case
            err = r.json()
            assert err["type"] == "invalid_request_error", case
            assert needle in err["message"], f"{case}: {err['message']!r} lacks {needle!r}"
        r = await c.get("/health")
        assert r.status_code == 200
        assert (await c.post("/generate", json=SEED_BODY)).json()["count_output_tokens"] == 17


# ------------------------------------------------------------------ graceful shutdown


async def test_sigterm_drains_inflight_stream(server: ServerProcess) -> None:
    """Last test of the module: SIGTERM lets an in-flight stream finish, then exits 0."""
    body = {"inputs": "List the planets", "parameters": {"max_new_tokens": 12, "ignore_eos": True}}
    async with client_for(server) as c:
        events = await stream_through_sigterm(c, server, body)
        assert len(events) == 12 and events[-1]["finished"] is True
        assert events[-1]["finish_reason"] == "length"
    status = await trio.to_thread.run_sync(server.wait, 60.0)
    assert status == 0, server.log_text()[-3000:]
