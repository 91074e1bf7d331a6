"""No request left hanging, slow clients contained, API keys: against a real server.

One `python -m server` process (keys from the environment and a file) serves the module;
raw sockets speak h11 so that keep-alive, bodies and timing are exactly what the test sends.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import h11
import httpx
import pytest

from server.app import create_app
from server.auth import bearer_token, key_matches, load_keys
from server.settings import Settings, build_arg_parser
from tests.server_helpers import ServerProcess, start_server

KEY_ENV, KEY_FILE = "env-key-1", "file-key-2"
AUTH = {"Authorization": f"Bearer {KEY_ENV}"}
MAX_BODY = 1024 * 1024
BODY_TIMEOUT_S = 2.0
KEEP_ALIVE_S = 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# one key per line\n{KEY_FILE}\n")
    srv = start_server(
        [
            "--max_total_token_num", "8192",
            "--max_req_total_len", "1024",
            "--max_body_bytes", str(MAX_BODY),
            "--body_timeout_s", str(BODY_TIMEOUT_S),
            "--keep_alive_s", str(KEEP_ALIVE_S),
            "--stream_buffer_events", "32",
            "--stream_stall_s", "3",
            "--socket_send_buffer_bytes", "16384",
            "--api_key_file", str(keys),
        ],
        env={"NURSERVE_API_KEY": f"{KEY_ENV},other-key"},
    )  # fmt: skip
    yield srv
    srv.stop()


def _request(
    sock: socket.socket, conn: h11.Connection, method: str, path: str, body: bytes
) -> tuple[int, dict[bytes, bytes]]:
    """Send one request with `body` on a kept-alive connection; (status, headers) of the answer."""
    headers = [("Host", "x"), ("Content-Length", str(len(body)))]
    sock.sendall(conn.send(h11.Request(method=method, target=path, headers=headers)))
    sock.sendall(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
    status, got = 0, {}
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = sock.recv(65536)
            assert data, f"connection closed before the answer to {method} {path}"
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            status, got = event.status_code, dict(event.headers)
        elif isinstance(event, h11.EndOfMessage):
            return status, got


@pytest.mark.slow
@pytest.mark.parametrize("method,path", [("HEAD", "/health"), ("GET", "/health")])
@pytest.mark.parametrize("size", [200_000, 900_000])
def test_bodies_routes_do_not_read_never_hang(
    server: ServerProcess, method: str, path: str, size: int
) -> None:
    """The issue's case: 3 requests with a body on one keep-alive connection all answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        conn = h11.Connection(h11.CLIENT)
        for _ in range(3):
            status, headers = _request(sock, conn, method, path, b"x" * size)
            assert status == 200
            assert b"connection" not in headers  # drained: the connection stays kept-alive
            conn.start_next_cycle()


@pytest.mark.slow
def test_body_over_the_limit_closes_after_the_answer(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        conn = h11.Connection(h11.CLIENT)
        status, headers = _request(sock, conn, "GET", "/healthz", b"x" * (MAX_BODY + 1))
        assert status == 200 and headers[b"connection"] == b"close"
        sock.settimeout(5)
        drained = b""
        while chunk := sock.recv(65536):  # the server closes: EOF, nothing more is sent
            drained += chunk
        assert drained == b""


def _trickle(sock: socket.socket, data: bytes, gap_s: float, limit_s: float) -> float:
    """Send `data` a byte at a time until the server closes; seconds until it did."""
    start = time.monotonic()
    sock.settimeout(gap_s)
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
            if sock.recv(65536) == b"":
                break
        except TimeoutError:
            pass
        except OSError:
            break
        assert time.monotonic() - start < limit_s, "the server kept a trickling client"
    return time.monotonic() - start


@pytest.mark.slow
def test_trickled_headers_and_bodies_are_cut(server: ServerProcess) -> None:
    """A byte every 0.25 s holds no connection for long: headers, then an unread/read body."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        took = _trickle(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 50, 0.25, 15)
    assert took < KEEP_ALIVE_S + 3
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head)
        took = _trickle(sock, b"{" * 500, 0.25, 15)
    assert took < BODY_TIMEOUT_S + 3


def _metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    line = next(x for x in text.splitlines() if x.startswith(name + " "))
    return float(line.split()[-1])


def _abort_non_readers(server: ServerProcess, auth: bytes, count: int) -> None:
    """`count` streams that never read are aborted and their KV freed; a reader still works."""
    body = json.dumps(
        {
            "inputs": "Tell me a long story.",
            "parameters": {"max_new_tokens": 900, "ignore_eos": True},
        }
    ).encode()
    head = (
        b"POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + auth
        + b"Content-Length: %d\r\n\r\n" % len(body)
    )
    headers = {"Authorization": auth[len("Authorization: ") : -2].decode()} if auth else {}
    before = _metric(server, "nurserve_stream_slow_reader_aborts_total")
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(head + body)
            socks.append(sock)
        deadline = time.monotonic() + 60
        while _metric(server, "nurserve_stream_slow_reader_aborts_total") < before + count:
            assert time.monotonic() < deadline, "non-reading streams were not aborted"
            time.sleep(0.5)
        assert _metric(server, "nurserve_requests_in_flight") == 0
        load = httpx.get(server.base_url + "/token_load", headers=headers, timeout=10).json()
        assert load["current_load"] < 0.05  # KV freed (at most cached prompt slots remain)
    finally:
        for sock in socks:
            sock.close()
    # A normal stream still gets every token.
    r = httpx.post(
        server.base_url + "/generate_stream",
        json={"inputs": "Hi", "parameters": {"max_new_tokens": 8, "ignore_eos": True}},
        headers=headers,
        timeout=60,
    )
    assert r.status_code == 200 and r.text.count("data:") == 8


@pytest.mark.slow
def test_clients_that_stop_reading_are_held_then_aborted(server: ServerProcess) -> None:
    """Four streams never read: each is held out of the decode batch (its client's TCP window
    closed), then aborted when it read nothing for --stream_stall_s, its KV freed."""
    holds = _metric(server, "nurserve_stream_holds_total")
    generated = _metric(server, "nurserve_generated_tokens_total")
    _abort_non_readers(server, b"Authorization: Bearer " + KEY_ENV.encode() + b"\r\n", 4)
    assert _metric(server, "nurserve_stream_holds_total") >= holds + 4  # paced first
    # Held, they made few tokens: about a closed 4 KB window each, plus probes (not 32 + 900).
    assert _metric(server, "nurserve_generated_tokens_total") - generated < 4 * 120 + 8


@pytest.mark.slow
def test_without_pacing_the_event_bound_aborts_non_readers() -> None:
    """--stream_pause_bytes 0: the --stream_buffer_events bound alone still aborts them."""
    srv = start_server(
        ["--max_total_token_num", "8192", "--max_req_total_len", "1024",
         "--stream_pause_bytes", "0", "--stream_buffer_events", "16",
         "--socket_send_buffer_bytes", "8192"]
    )  # fmt: skip
    try:
        _abort_non_readers(srv, b"", 2)
        assert _metric(srv, "nurserve_stream_holds_total") == 0
    finally:
        srv.stop()


@pytest.mark.slow
def test_api_keys(server: ServerProcess) -> None:
    base = server.base_url
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
    with httpx.Client(base_url=base, timeout=60) as client:
        for path in ("/health", "/healthz", "/liveness", "/readiness", "/metrics"):
            assert client.get(path).status_code == 200, path
        r = client.post("/generate", json=body)
        assert r.status_code == 401 and r.json()["field"] == "authorization"
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/token_load", headers={"Authorization": KEY_ENV}).status_code == 401
        for key in (KEY_ENV, "other-key", KEY_FILE):
            r = client.post("/generate", json=body, headers={"Authorization": f"bearer {key}"})
            assert r.status_code == 200, key
        assert client.get("/nowhere").status_code == 401  # no route list without a key


def test_key_helpers(tmp_path: Path) -> None:
    keys = (b"alpha", b"beta")
    assert key_matches(b"beta", keys) and not key_matches(b"bet", keys)
    assert bearer_token("Bearer  abc ") == b"abc" and bearer_token("Basic abc") is None
    path = tmp_path / "k"
    path.write_text("# c\n\nfile1\n")
    assert load_keys(Settings(api_key="a, b", api_key_file=str(path))) == (b"a", b"b", b"file1")
    with pytest.raises(ValueError, match="api_key_file"):
        load_keys(Settings(api_key_file=str(tmp_path / "missing")))
    help_text = build_arg_parser(Settings(api_key="s3cret")).format_help()
    assert "s3cret" not in help_text and "--api-key" in help_text
    assert "s3cret" not in repr(Settings(api_key="s3cret"))


async def test_protect_metrics() -> None:
    app = create_app(Settings(api_key="k", protect_metrics=True))
    client = app.test_client()
    assert (await client.get("/metrics")).status_code == 401
    assert (await client.get("/metrics", headers={"Authorization": "Bearer k"})).status_code == 200
    assert (await client.get("/health")).status_code == 503  # open, but no engine started


@pytest.mark.slow
def test_lone_surrogate_is_a_400(server: ServerProcess) -> None:
    """The fuzzer's find: JSON "\\ud800" decodes to text no tokenizer takes (was a 500)."""
    for path, body, field in (
        ("/generate", b'{"inputs": "a\\ud800", "parameters": {"max_new_tokens": 1}}', "inputs"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', None),
    ):
        r = httpx.post(
            server.base_url + path,
            content=body,
            headers={**AUTH, "Content-Type": "application/json"},
            timeout=30,
        )
        assert r.status_code == 400, r.text
        got = r.json()["field"] if field else r.json()["error"]["param"]
        assert got == (field or "messages")
