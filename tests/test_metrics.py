"""/metrics through prometheus_client: parsed with its own parser after real requests ran."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.server_helpers import ServerProcess, client_for, start_server

pytestmark = pytest.mark.slow

HISTOGRAMS = (
    "nurserve_time_to_first_token_seconds",
    "nurserve_request_queue_time_seconds",
    "nurserve_inter_token_latency_seconds",
    "nurserve_e2e_request_latency_seconds",
    "nurserve_request_prompt_tokens",
    "nurserve_request_generation_tokens",
)
IDLE_GAUGES = (
    "nurserve_requests_in_flight",
    "nurserve_num_requests_running",
    "nurserve_num_requests_waiting",
    "nurserve_kv_cache_usage_perc",
    "lightllm_queue_size",
    "lightllm_batch_current_size",
    "nurserve_kv_current_load",
)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    srv = start_server(["--max_total_token_num", "8192", "--max_req_total_len", "512"])
    yield srv
    srv.stop()


def families(text: str) -> dict[str, dict[str, float]]:
    """family name -> {sample name with labels: value}."""
    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(text):
        samples = out.setdefault(fam.name, {})
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return out


async def test_metrics_after_requests(server: ServerProcess) -> None:
    async with client_for(server) as c:
        await c.post(
            "/generate", json={"inputs": "What is AI?", "parameters": {"max_new_tokens": 4}}
        )
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
        async with c.stream("POST", "/v1/chat/completions", json=chat) as r:
            await r.aread()
        await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})  # a 400
        with trio.fail_after(30):
            while True:
                r = await c.get("/metrics")
                fams = families(r.text)
                if all(fams[g][f"{g}{{}}"] == 0 for g in IDLE_GAUGES):
                    break
                await trio.sleep(0.05)
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    for name in HISTOGRAMS:
        assert fams[name][f"{name}_count{{}}"] >= 2, name
        assert fams[name][f"{name}_bucket{{le=+Inf}}"] == fams[name][f"{name}_count{{}}"]
    outcomes = fams["nurserve_requests"]
    assert outcomes["nurserve_requests_total{outcome=success}"] == 2
    assert outcomes["nurserve_requests_total{outcome=invalid}"] == 1
    assert fams["lightllm_request_count"]["lightllm_request_count_total{}"] == 2
    assert fams["nurserve_generated_tokens"]["nurserve_generated_tokens_total{}"] >= 2
    assert fams["nurserve_engine_up"]["nurserve_engine_up{}"] == 1
    assert fams["nurserve_model_info"]["nurserve_model_info{model_name=default_model_name}"] == 1
