"""The server launched in other ways than the shared `python -m server` of test_server_http.py:
the hypercorn CLI configured by environment variables, and both launchers when the engine dies.
Each test starts (and stops) its own process.
"""

from __future__ import annotations

import signal

import pytest
import trio

from tests.server_helpers import SEED_BODY, client_for, start_server, stream_through_sigterm

pytestmark = pytest.mark.slow


async def test_hypercorn_cli_launch_with_env() -> None:
    """`hypercorn --worker-class trio 'server.app:create_app()'` configured by NURSERVE_* vars."""
    env = {
        "NURSERVE_MODEL_NAME": "cli-model",
        "NURSERVE_MAX_TOTAL_TOKEN_NUM": "4096",
        "NURSERVE_MAX_REQ_TOTAL_LEN": "256",
        "NURSERVE_MAX_BODY_BYTES": "2000",
        "NURSERVE_SHUTDOWN_GRACE_S": "20",
    }
    srv = await trio.to_thread.run_sync(
        lambda: start_server(
            ["--config", "python:server.hypercorn_config"], env, launcher="hypercorn"
        )
    )
    try:
        async with client_for(srv) as c:
            assert (await c.get("/get_model_name")).json() == {"model_name": "cli-model"}
            assert (await c.get("/health")).json() == {"message": "Ok"}
            out = (await c.post("/generate", json=SEED_BODY)).json()
            assert out["count_output_tokens"] == 17 and out["prompt_tokens"] == 4
            r = await c.post(
                "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 300}}
            )
            assert r.status_code == 400 and "256" in r.json()["message"]
            r = await c.post("/generate", content=b'{"inputs": "' + b"x" * 3000 + b'"}')
            assert r.status_code == 413

            # SIGTERM while a stream is in flight: it completes, then the process exits 0.
            body = {
                "inputs": "Count slowly",
                "parameters": {"max_new_tokens": 10, "ignore_eos": True},
            }
            events = await stream_through_sigterm(c, srv, body)
            assert len(events) == 10 and events[-1]["finished"] is True
        status = await trio.to_thread.run_sync(srv.wait, 60.0)
        assert status == 0, srv.log_text()[-3000:]
    finally:
        srv.stop()


@pytest.mark.parametrize("launcher", ["module", "hypercorn"])
async def test_engine_death_exits_nonzero(launcher: str) -> None:
    """The engine raises at step 3: 503s, /health 503, then the process exits with status 3."""
    env = {
        "NURSERVE_FAULT_INJECT_STEP": "3",
        "NURSERVE_DEATH_EXIT_DELAY_S": "2",
        "NURSERVE_MAX_TOTAL_TOKEN_NUM": "4096",
    }
    srv = await trio.to_thread.run_sync(lambda: start_server([], env, launcher=launcher))
    try:
        async with client_for(srv) as c:
            r = await c.post("/generate", json=SEED_BODY)
            assert r.status_code == 503 and "fault injected" in r.json()["message"]
            r = await c.get("/health")
            assert r.status_code == 503 and r.json()["message"] == "Error"
            r = await c.post("/generate", json=SEED_BODY)
            assert r.status_code == 503
        status = await trio.to_thread.run_sync(srv.wait, 30.0)
        # hypercorn's master reports 0 for a dead worker, so the worker SIGKILLs it (-9).
        assert status == (3 if launcher == "module" else -signal.SIGKILL), srv.log_text()[-3000:]
        assert "fault injected" in srv.log_text()
    finally:
        srv.stop()
