"""Scenario (a): fuzz every route and method with malformed and weird-but-valid bodies on
kept-alive connections, then a schemathesis run against /openapi.json.

`FuzzGen` draws requests from a seeded generator: valid LightLLM / OpenAI / tokens bodies with
odd texts and parameters, the same bodies with one value mutated (wrong type, out of range,
unknown key), and raw garbage (truncated JSON, invalid UTF-8, deep nesting, huge numbers,
bodies over --max_body_bytes) under odd Content-Types. Every answer must be < 500, come back
before the timeout, and carry a JSON object body when it is an error.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio
from stress_common import Outcome, RawClient

METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
GEN_ROUTES = ("/generate", "/generate_stream", "/")
OTHER_ROUTES = (
    "/health", "/healthz", "/liveness", "/readiness", "/token_load", "/tokens",
    "/get_model_name", "/metrics", "/openapi.json", "/v1/models", "/get_score",
    "/nowhere", "/v1/nothing", "/generate/extra", "/%ff%fe", "/tokens?text=hi&x=1",
    "/tokens?text=%00", "/" + "a" * 3000, "/generate?stream=1",
)  # fmt: skip
OPENAI_ROUTES = ("/v1/completions", "/v1/chat/completions")
TEXTS = (
    "What is AI?", "", " ", "\u0000", "😀" * 20, "Здравствуй мир", "<|im_start|>user\n",
    "\ud800", "a\r\nb", "x" * 3000, "<|endoftext|>" * 5, "\t\u200b\ufeff", "1 2 3 " * 40,
)  # fmt: skip
WEIRD = (
    None, True, False, 0, -1, 1, 2, 2**31, 2**63, 10**30, -(2**63), 0.0, -0.0, 1e-300, 1e300,
    0.5, "", "1", "x" * 500, [], [1], [None], {}, {"a": 1}, "NaN",
)  # fmt: skip
RAW = (
    b"", b"{", b"}", b"{}", b"[]", b"null", b"true", b"0", b'"x"', b'{"inputs":', b"\xff\xfe\x00",
    b'{"inputs": "\xff"}', b'{"inputs": NaN}', b'{"inputs": "a", "inputs": 1}',
    b"[" * 5000 + b"]" * 5000, b'{"inputs": "a", "parameters": {"max_new_tokens": 1e999}}',
    b'{"inputs": "a", "parameters": {"max_new_tokens": ' + b"9" * 5000 + b"}}",
    b"\xef\xbb\xbf{}", b"inputs=hi&parameters=1", b"\x00" * 100, b"{'inputs': 'hi'}",
)  # fmt: skip
# Keys whose loss would make a request legitimately long (the default length is up to
# --max_req_total_len): never deleted, so a request that takes past the timeout is a hang.
BOUNDING = ("max_new_tokens", "max_tokens", "parameters")
CONTENT_TYPES = (
    "application/json", "application/json", "application/json", "text/plain",
    "application/json; charset=latin-1", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x", "", "application/json;;;",
)  # fmt: skip


class FuzzGen:
    """A seeded source of (method, path, headers, body) requests."""

    def __init__(self, seed: int, max_body_bytes: int) -> None:
        self.rng = random.Random(seed)
        self.max_body_bytes = max_body_bytes

    def lightllm(self) -> dict[str, Any]:
        """A valid LightLLM body (at most 4 new tokens) with odd but legal values."""
        r = self.rng
        params: dict[str, Any] = {"max_new_tokens": r.randint(1, 4)}
        optional: dict[str, Any] = {
            "do_sample": r.random() < 0.5, "temperature": r.choice((0.1, 1.0, 1.9)),
            "top_p": r.choice((0.01, 0.5, 1.0)), "top_k": r.choice((-1, 1, 50)),
            "repetition_penalty": r.choice((0.5, 1.0, 2.0)), "frequency_penalty": 1,
            "presence_penalty": -2, "stop_sequences": r.choice(("a", ["\n", "the"], [], "\udfff")),
            "n": r.randint(1, 3), "seed": r.choice((0, 2**31 - 1)), "ignore_eos": True,
            "skip_special_tokens": False, "return_details": True, "min_new_tokens": 1,
        }  # fmt: skip
        for key in r.sample(sorted(optional), r.randint(0, 5)):
            params[key] = optional[key]
        if params.get("n", 1) > 1:
            params["best_of"] = params["n"]
            params["do_sample"] = True
        inputs: Any = r.choice(TEXTS) or "hi"
        if r.random() < 0.2:
            inputs = [r.randint(0, 49000) for _ in range(r.randint(1, 30))]
        return {"inputs": inputs, "parameters": params, "multimodal_params": {}}

    def openai(self, path: str) -> dict[str, Any]:
        """A valid OpenAI completions/chat body (at most 4 tokens)."""
        r = self.rng
        body: dict[str, Any] = {"max_tokens": r.randint(1, 4), "stream": r.random() < 0.4}
        if path.endswith("chat/completions"):
            role = r.choice(("user", "system", "developer"))
            body["messages"] = [{"role": role, "content": r.choice(TEXTS)}]
            if r.random() < 0.3:
                body["messages"].append(
                    {"role": "user", "content": [{"type": "text", "text": "hi"}]}
                )
        else:
            body["prompt"] = r.choice(TEXTS)
        extras = {"temperature": 0, "top_p": 0.5, "seed": 3, "n": 2, "stop": ["\n"], "user": "u"}
        for key in r.sample(sorted(extras), r.randint(0, 3)):
            body[key] = extras[key]
        if body["stream"] and r.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        return body

    def mutate(self, obj: Any) -> Any:
        """Replace, drop or add one value somewhere in `obj` (max token counts stay bounded)."""
        r = self.rng
        if not isinstance(obj, dict) or not obj:
            return r.choice(WEIRD)
        key = r.choice(sorted(obj))
        child = obj[key]
        if isinstance(child, dict) and child and r.random() < 0.6:
            obj[key] = self.mutate(child)
            return obj
        roll = r.random()
        if roll < 0.15:
            obj["unknown_" + str(r.randint(0, 9))] = r.choice(WEIRD)
        elif roll < 0.25 and key not in BOUNDING:
            del obj[key]
        else:
            value = r.choice(WEIRD)
            if key in ("max_new_tokens", "max_tokens") and isinstance(value, int):
                value = value if value <= 0 or value > 4096 else 2
            if key in BOUNDING and value in (None, {}):
                value = -1  # null / {} mean "up to --max_req_total_len": slow, not weird
            obj[key] = value
        return obj

    def body_for(self, method: str, path: str) -> bytes:
        """A body for this route: valid, mutated, raw garbage or oversized."""
        r = self.rng
        roll = r.random()
        if roll < 0.02:
            return b"x" * (self.max_body_bytes + r.randint(1, 1000))
        if roll < 0.2 or method in ("GET", "HEAD", "DELETE", "OPTIONS") and roll < 0.6:
            return r.choice(RAW) if r.random() < 0.7 else r.randbytes(r.randint(1, 5000))
        if path in OPENAI_ROUTES:
            obj: Any = self.openai(path)
        elif path.startswith("/tokens"):
            obj = {"text": r.choice(TEXTS)}
        elif path == "/get_score":
            obj = {"chat": r.choice(TEXTS)}
        else:
            obj = self.lightllm()
        if r.random() < 0.5:
            obj = self.mutate(obj)
        return json.dumps(obj).encode("utf-8", "surrogatepass")

    def request(self) -> tuple[str, str, list[tuple[str, str]], bytes]:
        """The next (method, path, headers, body)."""
        r = self.rng
        path = r.choice((*GEN_ROUTES, *OPENAI_ROUTES, *OTHER_ROUTES))
        method = "POST" if r.random() < 0.5 else r.choice(METHODS)
        body = self.body_for(method, path)
        ctype = r.choice(CONTENT_TYPES)
        headers = [("Content-Type", ctype)] if ctype else []
        if r.random() < 0.05:
            headers.append(("Accept-Encoding", "gzip"))
        return method, path, headers, body


def _bad_error_body(method: str, status: int, body: bytes) -> bool:
    """An error answer whose body is not a JSON object (HEAD answers have no body)."""
    if status < 400 or method == "HEAD":
        return False
    try:
        return not isinstance(json.loads(body), dict)
    except (ValueError, UnicodeDecodeError):
        return True


async def fuzz(url_port: int, n: int, workers: int, seed: int, max_body: int, timeout_s: float):
    """Send `n` generated requests over `workers` kept-alive connections; the tallies."""
    gen = FuzzGen(seed, max_body)
    tally: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    examples: list[str] = []
    left = [n]
    connects = [0]

    async def worker() -> None:
        cli = RawClient(url_port)
        while left[0] > 0:
            left[0] -= 1
            method, path, headers, body = gen.request()
            with trio.move_on_after(timeout_s) as scope:
                try:
                    reply = await cli.request(method, path, body, headers)
                except Exception as exc:  # noqa: BLE001  (a transport failure is a figure)
                    oversized = len(body) > max_body
                    tally["closed_over_limit" if oversized else "transport_errors"] += 1
                    examples.append(f"{method} {path} {body[:80]!r}: {type(exc).__name__} {exc}")
                    await cli.close()
                    continue
            if scope.cancelled_caught:
                tally["hung"] += 1
                examples.insert(0, f"HUNG {method} {path} {body[:400]!r}")
                await cli.close()
                continue
            statuses[reply.status] += 1
            if reply.status >= 500:
                examples.append(
                    f"{reply.status} {method} {path} {body[:80]!r} {reply.body[:200]!r}"
                )
            if _bad_error_body(method, reply.status, reply.body):
                tally["non_json_errors"] += 1
                examples.append(f"non-JSON {reply.status} {method} {path}: {reply.body[:120]!r}")
        connects[0] += cli.connects
        await cli.close()

    start = time.monotonic()
    async with trio.open_nursery() as nursery:
        for _ in range(workers):
            nursery.start_soon(worker)
    return tally, statuses, examples, connects[0], time.monotonic() - start


def schemathesis_run(url: str, max_examples: int, max_time_s: int) -> dict[str, Any]:
    """`schemathesis run` (not_a_server_error, content types, status codes) on /openapi.json."""
    exe = Path(sys.executable).parent / "schemathesis"
    cmd = [str(exe)] if exe.exists() else [shutil.which("schemathesis") or "schemathesis"]
    cmd += [
        "run", f"{url}/openapi.json", "--checks",
        "not_a_server_error,content_type_conformance,status_code_conformance",
        "--max-examples", str(max_examples), "--max-time", str(max_time_s), "--seed", "1",
        "--workers", "1", "--request-timeout", "120", "--no-color", "--phases",
        "examples,coverage,fuzzing", "--generation-database", "none",
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max_time_s + 300)
    out = proc.stdout + proc.stderr
    summary = [ln for ln in out.splitlines() if "passed" in ln or "failed" in ln or "error" in ln]
    return {
        "exit_status": proc.returncode,
        "seconds": round(time.monotonic() - start, 1),
        "summary": summary[-3:],
        "tail": out[-3000:] if proc.returncode else "",
    }


async def scenario_fuzz(
    port: int,
    url: str,
    *,
    requests: int,
    workers: int,
    max_body_bytes: int,
    seed: int = 0,
    schema_examples: int = 20,
    schema_time_s: int = 60,
) -> Outcome:
    """(a): the generator's requests, then schemathesis."""
    tally, statuses, examples, connects, took = await fuzz(
        port, requests, workers, seed, max_body_bytes, timeout_s=60.0
    )
    fivexx = sum(c for s, c in statuses.items() if s >= 500)
    out = Outcome("a", "fuzz: malformed and weird-but-valid requests, every route and method")
    out.figures = {
        "requests": requests,
        "connections": connects,
        "seconds": round(took, 1),
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "5xx": fivexx,
        "hung": tally["hung"],
        "non_json_errors": tally["non_json_errors"],
        "transport_errors": tally["transport_errors"],
        "closed_while_sending_over_limit_body": tally["closed_over_limit"],
        "examples": examples[:10],
    }
    out.checks = {
        "no 5xx": fivexx == 0,
        "none hung": tally["hung"] == 0,
        "JSON error bodies": tally["non_json_errors"] == 0,
        "no transport errors": tally["transport_errors"] == 0,
    }
    if schema_examples > 0:
        st = await trio.to_thread.run_sync(schemathesis_run, url, schema_examples, schema_time_s)
        out.figures["schemathesis"] = st
        out.checks["schemathesis clean"] = st["exit_status"] == 0
    return out
