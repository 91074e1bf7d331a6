"""The HTTP layer in-process: Quart-Trio's test client on the real engine (default model).

The weights load once per session; each test builds a fresh `AsyncEngine` (fresh scheduler,
KV accounting and fault injection) around them, so an app start costs milliseconds (conftest.py's
`make_app`). Bad requests are in test_server_validation.py.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from typing import Any

import pytest
import trio

from runtime.engine.args import EngineArgs
from runtime.sampling.params import parse_sampling_params
from runtime.text.tokenizer import Tokenizer
from server.app import get_app_state
from server.settings import OPTIONS, Settings, markdown_table, parse_args
from server.stream import start_stream, stream_response_body
from server.validation import GenerateRequest
from tests.server_helpers import SEED_BODY, Factory, serving

pytestmark = pytest.mark.slow


async def post_stream(client: Any, path: str, body: Any) -> tuple[int, Any, bytes]:
    """POST and read the body while the app writes it (the test client's `post` waits for the
    app to finish first, which deadlocks on more than 10 body chunks)."""
    async with client.request(
        path, method="POST", headers={"Content-Type": "application/json"}
    ) as conn:
        await conn.send(json.dumps(body).encode())
        await conn.send_complete()
        data = bytearray()
        while True:
            try:
                data += await conn.receive()
            except trio.EndOfChannel:
                break
    return conn.status_code, conn.headers, bytes(data)


async def wait_until(predicate: Callable[[], bool], timeout_s: float) -> None:
    """Poll `predicate` until true (TooSlowError after `timeout_s`)."""
    with trio.fail_after(timeout_s):
        while True:
            if predicate():
                return
            await trio.sleep(0.01)


def sse_events(body: bytes) -> list[dict[str, Any]]:
    """Parse a LightLLM SSE body strictly: `data:{json}\\n\\n` frames, nothing else."""
    assert body.endswith(b"\n\n"), body[-80:]
    frames = body.decode("utf-8").split("\n\n")[:-1]
    out = []
    for frame in frames:
        assert frame.startswith("data:{"), frame  # no space after "data:", no [DONE]
        out.append(json.loads(frame[len("data:") :]))
    return out


# ------------------------------------------------------------------ settings


def test_settings_from_env_and_flags() -> None:
    env = {
        "NURSERVE_MAX_TOTAL_TOKEN_NUM": "1234",
        "NURSERVE_EOS_ID": "2, 7",
        "NURSERVE_DISABLE_CUDAGRAPH": "true",
        "NURSERVE_PORT": "9000",
        "NURSERVE_MAX_BODY_BYTES": "1000",
    }
    s = Settings.from_env(env)
    assert (s.max_total_token_num, s.eos_id, s.disable_cudagraph, s.port) == (
        1234,
        [2, 7],
        True,
        9000,
    )
    flags = parse_args(["--port", "9100", "--eos_id", "3", "4", "--mem_fraction", "0.5"], env)
    assert (flags.port, flags.eos_id, flags.mem_fraction, flags.max_body_bytes) == (
        9100,
        [3, 4],
        0.5,
        1000,
    )
    args = flags.to_engine_args()
    assert isinstance(args, EngineArgs)
    assert (args.max_total_token_num, args.eos_id, args.disable_cudagraph) == (1234, [3, 4], True)
    assert args.model_dir is None  # the embedded default
    assert Settings().to_engine_args() == EngineArgs()  # unset options keep the engine's defaults
    with pytest.raises(ValueError, match="NURSERVE_PORT"):
        Settings.from_env({"NURSERVE_PORT": "eighty"})
    with pytest.raises(ValueError, match="mem_fraction"):
        Settings.from_env({"NURSERVE_MEM_FRACTION": "1.5"})
    table = markdown_table()
    assert all(f"`{o.env}`" in table and f"`--{o.name}`" in table for o in OPTIONS)


def test_bad_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(["--data_type", "int3"], {})
    assert info.value.code == 2
    assert "data_type" in capsys.readouterr().err


# ------------------------------------------------------------------ cheap routes


async def test_cheap_routes(make_app: Factory) -> None:
    async with serving(make_app()) as client:
        for path in ("/health", "/healthz"):
            r = await client.get(path)
            assert r.status_code == 200 and await r.get_json() == {"message": "Ok"}
        r = await client.head("/health")
        assert r.status_code == 200
        for path in ("/liveness", "/readiness"):
            for method in ("GET", "POST"):
                r = await client.open(path, method=method)
                assert r.status_code == 200 and await r.get_json() == {"status": "ok"}
        r = await client.get("/token_load")
        load = await r.get_json()
        assert list(load) == ["current_load", "logical_max_load", "dynamic_max_load"]
        assert all(isinstance(v, float) for v in load.values()) and load["current_load"] == 0.0
        for method in ("GET", "POST"):
            r = await client.open("/get_model_name", method=method)
            assert await r.get_json() == {"model_name": "default_model_name"}
        r = await client.post("/tokens", json={"text": "What is AI?", "parameters": {}})
        assert await r.get_json() == {"ntokens": 4}
        r = await client.get("/tokens", query_string={"text": "What is AI?"})
        assert await r.get_json() == {"ntokens": 4}
        r = await client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = (await r.get_data()).decode()
        assert "# TYPE lightllm_request_count counter" in text
        r = await client.get("/nope")
        assert r.status_code == 404
        body = await r.get_json()
        assert body["type"] == "invalid_request_error" and "/nope" in body["message"]
        r = await client.get("/generate")
        assert r.status_code == 405 and "POST" in r.headers["Allow"]
        assert "GET" in (await r.get_json())["message"]
        r = await client.post("/get_score", json={"chat": "hi"})
        assert r.status_code == 400 and "reward model" in (await r.get_json())["message"]


# ------------------------------------------------------------------ generation


async def test_generate_seed_example(make_app: Factory, tokenizer: Tokenizer) -> None:
    async with serving(make_app()) as client:
        r = await client.post("/generate", json=SEED_BODY)
        assert r.status_code == 200, await r.get_data()
        assert r.headers["Content-Type"] == "application/json"
        body = await r.get_json()
        assert list(body) == [
            "generated_text",
            "count_output_tokens",
            "finish_reason",
            "prompt_tokens",
            "cached_tokens",
        ]
        assert isinstance(body["generated_text"], list) and len(body["generated_text"]) == 1
        assert body["count_output_tokens"] == 17
        assert body["finish_reason"] == "length"
        assert body["prompt_tokens"] == 4

        # The same request as token ids gives the same greedy text.
        ids = tokenizer.encode(SEED_BODY["inputs"])
        assert len(ids) == body["prompt_tokens"]
        r = await client.post("/generate", json={**SEED_BODY, "inputs": ids})
        again = await r.get_json()
        assert again["generated_text"] == body["generated_text"]
        assert again["cached_tokens"] == len(ids) - 1  # the prefix cache kept the prompt's K/V

        # return_details: one entry per token; cumlogprob is the running sum.
        params = {**SEED_BODY["parameters"], "return_details": True}
        r = await client.post("/generate", json={**SEED_BODY, "parameters": params})
        detailed = await r.get_json()
        toks = detailed["tokens"]
        assert len(toks) == 17 and detailed["generated_text"] == body["generated_text"]
        assert set(toks[0]) >= {
            "id",
            "text",
            "logprob",
            "cumlogprob",
            "special",
            "count_output_tokens",
            "prompt_tokens",
        }
        assert "".join(t["text"] for t in toks) == body["generated_text"][0]
        assert toks[-1]["cumlogprob"] == pytest.approx(sum(t["logprob"] for t in toks), rel=1e-5)
        assert [t["count_output_tokens"] for t in toks] == list(range(1, 18))

        # POST / dispatches on stream.
        r = await client.post("/", json=SEED_BODY)
        assert (await r.get_json())["generated_text"] == body["generated_text"]
        status, headers, data = await post_stream(client, "/", {**SEED_BODY, "stream": True})
        assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(data)
        assert "".join(e["token"]["text"] for e in events) == body["generated_text"][0]


async def test_generate_stream_framing(make_app: Factory) -> None:
    async with serving(make_app()) as client:
        status, headers, data = await post_stream(client, "/generate_stream", SEED_BODY)
        assert status == 200
        assert headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(data)
        assert len(events) == 17
        for i, ev in enumerate(events, 1):
            keys = ["token", "generated_text", "finished", "finish_reason", "details"]
            assert list(ev) == keys + ["cached_tokens"] * (i == 17)
            assert list(ev["token"]) == [
                "id",
                "text",
                "logprob",
                "special",
                "count_output_tokens",
                "prompt_tokens",
            ]
            assert ev["token"]["count_output_tokens"] == i and ev["token"]["prompt_tokens"] == 4
            assert ev["generated_text"] is None and ev["details"] is None
            assert ev["finished"] is (i == 17)
            assert ev["finish_reason"] == ("length" if i == 17 else None)
        r = await client.post("/generate", json=SEED_BODY)
        assert (
            "".join(e["token"]["text"] for e in events) == (await r.get_json())["generated_text"][0]
        )


async def test_n_greater_than_one(make_app: Factory) -> None:
    async with serving(make_app()) as client:
        body = {
            "inputs": "Once upon a time",
            "parameters": {
                "n": 2,
                "max_new_tokens": 5,
                "do_sample": True,
                "seed": 7,
                "return_details": True,
            },
        }
        r = await client.post("/generate", json=body)
        out = await r.get_json()
        assert r.status_code == 200, out
        assert len(out["generated_text"]) == 2
        assert out["count_output_tokens"] == [5, 5] and out["finish_reason"] == ["length", "length"]
        assert isinstance(out["prompt_tokens"], int)
        assert [len(t) for t in out["tokens"]] == [5, 5]
        _, _, data = await post_stream(client, "/generate_stream", body)
        events = sse_events(data)
        assert sorted(e["index"] for e in events) == [0] * 5 + [1] * 5
        assert sum(e["finished"] for e in events) == 2 and events[-1]["finished"]


async def test_stop_sequence_and_eos(make_app: Factory) -> None:
    async with serving(make_app()) as client:
        base = await (await client.post("/generate", json=SEED_BODY)).get_json()
        text = base["generated_text"][0]
        stop = text.split()[2]  # a word the greedy answer produces
        body = {**SEED_BODY, "parameters": {**SEED_BODY["parameters"], "stop_sequences": [stop]}}
        out = await (await client.post("/generate", json=body)).get_json()
        assert out["finish_reason"] == "stop" and out["count_output_tokens"] < 17
        assert out["generated_text"][0].endswith(stop) and text.startswith(out["generated_text"][0])
        # EOS counts as an output token and adds "" to the text.
        chat = "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
        out = await (
            await client.post(
                "/generate",
                json={"inputs": chat, "parameters": {"max_new_tokens": 64, "return_details": True}},
            )
        ).get_json()
        assert out["finish_reason"] == "stop"  # greedy: the model answers and ends with EOS
        last = out["tokens"][-1]
        assert last["text"] == "" and last["count_output_tokens"] == out["count_output_tokens"]


# ------------------------------------------------------------------ backpressure, abort, death


async def test_queue_full_is_503_with_retry_after(make_app: Factory) -> None:
    async with serving(make_app(max_waiting_reqs=0)) as client:
        for path in ("/generate", "/generate_stream"):
            r = await client.post(path, json=SEED_BODY)
            assert r.status_code == 503
            assert int(r.headers["Retry-After"]) >= 1
            err = await r.get_json()
            assert "busy" in err["message"] and err["type"] == "server_busy"
        assert (await client.get("/health")).status_code == 200


async def test_stream_disconnect_aborts_request(make_app: Factory) -> None:
    app = make_app()
    async with serving(app) as client:
        state = get_app_state(app)
        body = json.dumps(
            {
                "inputs": "Tell me a long story",
                "parameters": {"max_new_tokens": 400, "ignore_eos": True},
            }
        ).encode()
        with trio.CancelScope() as scope:
            async with client.request(
                "/generate_stream", method="POST", headers={"Content-Type": "application/json"}
            ) as conn:
                await conn.send(body)
                await conn.send_complete()
                first = await conn.receive()
                assert first.startswith(b"data:{")
                assert state.in_flight == 1
                await conn.disconnect()
                scope.cancel()  # the test client would wait for a body end that never comes
        await wait_until(lambda: state.in_flight == 0 and state.engine.load().current_load == 0, 5)  # type: ignore[union-attr]
        assert state.counters.request_aborted == 1
        r = await client.post("/generate", json=SEED_BODY)
        assert (await r.get_json())["count_output_tokens"] == 17


async def test_never_read_stream_is_aborted(make_app: Factory) -> None:
    """A stream whose body is dropped before its first write (client gone in between)."""
    app = make_app()
    async with serving(app):
        state = get_app_state(app)
        params = parse_sampling_params({"max_new_tokens": 400, "ignore_eos": True})
        job = await start_stream(
            state, app.nursery, GenerateRequest([1, 2, 3], params, False, True)
        )
        body = stream_response_body(job)
        assert state.in_flight == 1
        del body  # never iterated: only the weakref finalizer can abort the request
        gc.collect()
        await wait_until(lambda: state.in_flight == 0, 2)  # the watchdog alone would take 5 s
        assert state.counters.request_aborted == 1


async def test_engine_death(make_app: Factory) -> None:
    deaths: list[BaseException] = []
    app = make_app(deaths, fault_inject_step=3)
    async with serving(app) as client:
        # In flight when the engine dies: a stream gets an SSE error event after its tokens.
        status, _, data = await post_stream(client, "/generate_stream", SEED_BODY)
        assert status == 200
        events = sse_events(data)
        assert events[-1]["finished"] is True and events[-1]["finish_reason"] == "error"
        assert (
            events[-1]["error"]["type"] == "server_error"
            and "fault" in events[-1]["error"]["message"]
        )
        await wait_until(lambda: bool(deaths), 5)
        assert "fault injected" in str(deaths[0])
        for path in ("/health", "/healthz", "/readiness", "/liveness"):
            r = await client.get(path)
            assert r.status_code == 503, path
        assert (await (await client.get("/health")).get_json())["message"] == "Error"
        r = await client.post("/generate", json=SEED_BODY)
        assert r.status_code == 503 and "engine failed" in (await r.get_json())["message"]


async def test_engine_death_non_streaming(make_app: Factory) -> None:
    app = make_app(fault_inject_step=2)
    async with serving(app) as client:
        r = await client.post("/generate", json=SEED_BODY)
        assert r.status_code == 503
        err = await r.get_json()
        assert "fault injected" in err["message"] and err["type"] == "server_error"


async def test_stall_makes_health_503(make_app: Factory) -> None:
    app = make_app()
    async with serving(app) as client:
        state = get_app_state(app)
        state.settings.stall_timeout_s = 0.2
        state.request_started()  # a request in flight that never progresses
        assert (await client.get("/health")).status_code == 200
        await trio.sleep(0.3)
        r = await client.get("/health")
        assert r.status_code == 503 and "stalled" in (await r.get_json())["reason"]
        state.request_ended()
        assert (await client.get("/health")).status_code == 200
