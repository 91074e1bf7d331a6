"""/get_score end to end: a real server on a tiny InternLM2 reward checkpoint."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from runtime.text.tokenizer import Tokenizer
from tests.server_helpers import (
    ServerProcess,
    make_tiny_reward_checkpoint,
    start_server,
    tiny_reward_score,
)

SEED_QUERY = (
    "<|im_start|>user\nHello! What's your name?<|im_end|>\n<|im_start|>assistant\n"
    "My name is InternLM2! A helpful AI assistant. What can I do for you?<|im_end|>\n<|reward|>"
)

pytestmark = pytest.mark.slow  # starts a server


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_reward_checkpoint(tmp_path_factory.mktemp("reward"), "internlm2_reward")


@pytest.fixture(scope="module")
def reward_server(reward_dir: Path) -> Iterator[ServerProcess]:
    # fp32 weights: the scores are compared with our fp32 runtime to 1e-4
    srv = start_server(
        ["--model_dir", str(reward_dir), "--max_total_token_num", "8192", "--data_type", "fp32"]
    )
    try:
        yield srv
    finally:
        srv.stop()


def client(srv: ServerProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=srv.base_url, timeout=60.0)


async def test_seed_get_score_example(reward_server: ServerProcess, reward_dir: Path) -> None:
    """The seed's Python example (json.dumps body, `parameters` with frequency_penalty)."""
    data = {"chat": SEED_QUERY, "parameters": {"frequency_penalty": 1}}
    async with client(reward_server) as c:
        r = await c.post(
            "/get_score", content=json.dumps(data), headers={"Content-Type": "application/json"}
        )
    assert r.status_code == 200, r.text
    out = r.json()
    ids = Tokenizer.from_dir(reward_dir).encode(SEED_QUERY)
    assert isinstance(out["score"], float) and out["finish_reason"] == "stop"
    assert out["prompt_tokens"] == len(ids)
    assert abs(out["score"] - tiny_reward_score(reward_dir, ids)) <= 1e-4


async def test_score_alone_equals_score_among_32_concurrent(reward_server: ServerProcess) -> None:
    async with client(reward_server) as c:
        alone = (await c.post("/get_score", json={"chat": SEED_QUERY})).json()["score"]
        results: dict[int, httpx.Response] = {}

        async def send(i: int) -> None:
            if i == 13:
                body = {"chat": SEED_QUERY}
            else:
                body = {
                    "chat": f"<|im_start|>user\nquestion {i} "
                    + "more " * i
                    + "<|im_end|>\n<|reward|>"
                }
            if i % 4 == 3:  # generate requests mixed in: a reward model cannot generate
                r = await c.post(
                    "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}
                )
            else:
                r = await c.post("/get_score", json=body)
            results[i] = r

        async with trio.open_nursery() as nursery:
            for i in range(32):
                nursery.start_soon(send, i)
        assert abs(results[13].json()["score"] - alone) <= 1e-5
        for i, r in results.items():
            if i % 4 == 3:
                assert 400 <= r.status_code < 500 and "message" in r.json()
            else:
                assert r.status_code == 200 and isinstance(r.json()["score"], float)
        assert len({results[i].json()["score"] for i in results if i % 4 != 3}) > 1
        load = (await c.get("/token_load")).json()
        assert load["current_load"] == 0.0


async def test_chat_list_scores_in_order(reward_server: ServerProcess) -> None:
    chats = [SEED_QUERY, "<|im_start|>user\nhi<|im_end|>\n<|reward|>", SEED_QUERY + " more"]
    async with client(reward_server) as c:
        singles = [(await c.post("/get_score", json={"chat": t})).json() for t in chats]
        r = await c.post("/get_score", json={"chat": chats})
        assert r.status_code == 200
        batch = r.json()
        assert [b["prompt_tokens"] for b in batch] == [s["prompt_tokens"] for s in singles]
        assert all(
            abs(b["score"] - s["score"]) <= 1e-5 for b, s in zip(batch, singles, strict=True)
        )
        for bad, field in (
            ({"chat": []}, "chat"),
            ({"chat": ["ok", 3]}, "chat"),
            ({"chats": "x"}, "chats"),
        ):
            r = await c.post("/get_score", json=bad)
            assert r.status_code == 400 and field in r.json()["message"], r.text
