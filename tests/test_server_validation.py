"""Bad requests to the in-process app: every malformed body, parameter and length gets a 400
(or 413) naming the field, and nothing stays in flight. Fixtures: conftest.py's `make_app`.
"""

from __future__ import annotations

from typing import Any

import pytest

from server.app import get_app_state
from tests.server_helpers import MAX_LEN, Factory, serving

pytestmark = pytest.mark.slow


# fmt: off
BAD_REQUESTS: list[tuple[str, Any, int, str | None]] = [
    # (path, body (bytes = raw), status, field)
    ("/generate", b"{not json", 400, "body"),
    ("/generate", b"", 400, "body"),
    ("/generate", b"[1, 2]", 400, "body"),
    ("/generate", b'"text"', 400, "body"),
    ("/generate", b'{"inputs": NaN}', 400, "body"),
    ("/generate", b"\xff\xfe", 400, "body"),
    ("/generate", {"parameters": {}}, 400, "inputs"),
    ("/generate", {"inputs": ""}, 400, "inputs"),
    ("/generate", {"inputs": []}, 400, "inputs"),
    ("/generate", {"inputs": 42}, 400, "inputs"),
    ("/generate", {"inputs": None}, 400, "inputs"),
    ("/generate", {"inputs": [1, "a"]}, 400, "inputs"),
    ("/generate", {"inputs": [1, True]}, 400, "inputs"),
    ("/generate", {"inputs": [-1]}, 400, "inputs"),
    ("/generate", {"inputs": [49152]}, 400, "inputs"),
    ("/generate", {"inputs": "hi", "parameters": []}, 400, "parameters"),
    ("/generate", {"inputs": "hi", "parameters": {"temperature": -1}}, 400, "temperature"),
    ("/generate", {"inputs": "hi", "parameters": {"top_p": 0}}, 400, "top_p"),
    ("/generate", {"inputs": "hi", "parameters": {"top_k": 0}}, 400, "top_k"),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 0}}, 400, "max_new_tokens"),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": "5"}}, 400, "max_new_tokens"),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": MAX_LEN}}, 400, "max_new_tokens"),
    ("/generate", {"inputs": "hi", "parameters": {"temprature": 0.5}}, 400, "temprature"),
    ("/generate", {"inputs": "hi", "parameters": {"n": 9}}, 400, "n"),
    ("/generate", {"inputs": "hi", "parameters": {"return_details": "yes"}}, 400, "return_details"),
    ("/generate", {"inputs": "hi", "parameters": {"stop_sequences": 5}}, 400, "stop_sequences"),
    ("/generate", {"inputs": "hi", "parameters": {"min_new_tokens": 9, "max_new_tokens": 2}}, 400, "min_new_tokens"),
    ("/generate", {"inputs": "hi", "multimodal_params": {"images": [{"type": "url", "data": "x"}]}}, 400, "multimodal_params.images"),
    ("/generate", {"inputs": "hi", "multimodal_params": {"audios": [{"type": "base64", "data": "x"}]}}, 400, "multimodal_params.audios"),
    ("/generate", {"inputs": "hi", "multimodal_params": []}, 400, "multimodal_params"),
    ("/generate", {"inputs": "hi", "extra": 1}, 400, "extra"),
    ("/generate", {"inputs": "word " * (MAX_LEN + 10)}, 400, "inputs"),
    ("/generate", {"inputs": "x" * (8 * MAX_LEN + 1)}, 400, "inputs"),
    ("/generate", {"inputs": "hi", "stream": "yes"}, 400, "stream"),
    ("/generate_stream", {"inputs": "hi", "parameters": {"top_p": 2}}, 400, "top_p"),
    ("/generate_stream", {"inputs": "hi", "parameters": {"max_new_tokens": MAX_LEN}}, 400, "max_new_tokens"),
    ("/", {"inputs": [], "stream": True}, 400, "inputs"),
    ("/tokens", {"parameters": {}}, 400, "text"),
    ("/tokens", {"text": 5}, 400, "text"),
    ("/get_score", {"chat": "hi"}, 400, None),
    ("/generate", b'{"inputs": "' + b"a" * 70_000 + b'"}', 413, "body"),
]
# fmt: on


@pytest.mark.parametrize(("path", "body", "status", "field"), BAD_REQUESTS)
async def test_bad_request(
    make_app: Factory, path: str, body: Any, status: int, field: str | None
) -> None:
    app = make_app()
    async with serving(app) as client:
        if isinstance(body, bytes):
            r = await client.post(path, data=body, headers={"Content-Type": "application/json"})
        else:
            r = await client.post(path, json=body)
        assert r.status_code == status, await r.get_data()
        assert r.headers["Content-Type"] == "application/json"
        err = await r.get_json()
        assert err["field"] == field and err["type"] == "invalid_request_error"
        assert isinstance(err["message"], str) and len(err["message"]) > 10
        if field and "." not in field and field not in ("body",):
            assert field in err["message"]
        assert get_app_state(app).in_flight == 0


async def test_length_error_names_the_numbers(make_app: Factory) -> None:
    async with serving(make_app()) as client:
        r = await client.post(
            "/generate", json={"inputs": [1, 2, 3], "parameters": {"max_new_tokens": MAX_LEN}}
        )
        msg = (await r.get_json())["message"]
        assert r.status_code == 400
        assert (
            "max_new_tokens" in msg
            and str(MAX_LEN) in msg
            and "3" in msg
            and "max_req_total_len" in msg
        )
