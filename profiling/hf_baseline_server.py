#!/usr/bin/env python3
"""A naive baseline server: HF transformers `generate`, one request at a time, OpenAI streaming.

    python profiling/hf_baseline_server.py --port 8092 [--model-dir DIR] [--threads 2]

Serves `POST /v1/completions` with `"stream": true` (the request shape of bench_serving's openai
backend: prompt, max_tokens, temperature, ignore_eos, stream_options.include_usage), `GET /health`
and `POST /tokenize` ({"content"} -> {"tokens"}). Requests are served strictly one after another:
a global lock is held for the whole generation, later requests wait on it (the threaded stdlib HTTP
server accepts their connections meanwhile). fp32 weights, `torch.set_num_threads(2)` by default,
greedy unless a temperature > 0 is sent, `ignore_eos` -> min_new_tokens = max_tokens.

The model is the HF folder the embedded default model is converted into
(`runtime.loading.default_model.default_model_dir()`) unless `--model-dir` is given.

Streaming goes through a `TextIteratorStreamer` subclass that emits one chunk per generated token
(the stock streamer holds text back until a word ends, which would turn ITL into inter-word
latency); incomplete UTF-8 (U+FFFD at the end) is held back until it completes.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def default_model_dir() -> Path:
    """The converted HF folder of nurserve's default model."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from runtime.loading.default_model import default_model_dir as _dir

    return Path(_dir())


class Model:
    """Tokenizer + fp32 causal LM, with one generation at a time."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.name = model_dir.name
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.model.eval()
        self.lock = threading.Lock()
        eos = self.model.generation_config.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = eos[0] if isinstance(eos, list) else eos

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])


def make_streamer(tokenizer: Any) -> Any:
    """A TextIteratorStreamer that yields the new text of every token (never partial UTF-8)."""
    from transformers import TextIteratorStreamer

    class TokenStreamer(TextIteratorStreamer):
        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.ids: list[int] = []
            self.sent = 0  # characters of the decoded text already emitted

        def put(self, value: Any) -> None:
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            self.ids.extend(int(t) for t in value.reshape(-1).tolist())
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            new = "" if text.endswith("\ufffd") else text[self.sent :]
            self.sent += len(new)
            # one queue item per token, even when it adds no text (special or held back)
            self.text_queue.put((new, len(self.ids)), timeout=self.timeout)

        def end(self) -> None:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            if len(text) > self.sent:
                self.text_queue.put((text[self.sent :], len(self.ids)), timeout=self.timeout)
            self.next_tokens_are_prompt = True
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    return TokenStreamer()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hf-baseline/1"
    model: Model  # set on the class by main()

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _json(self, code: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> dict[str, Any] | None:
        try:
            n = int(self.headers.get("Content-Length") or 0)
            obj = json.loads(self.rfile.read(n) or b"{}")
        except (ValueError, OSError):
            obj = None
        if not isinstance(obj, dict):
            self._json(400, {"error": {"message": "body must be a JSON object"}})
            return None
        return obj

    def do_GET(self) -> None:
        if self.path in ("/health", "/healthz"):
            self._json(200, {"status": "ok"})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        if self.path == "/tokenize":
            body = self._body()
            if body is not None:
                text = body.get("content", body.get("prompt", ""))
                self._json(200, {"tokens": self.model.encode(str(text))})
        elif self.path == "/v1/completions":
            body = self._body()
            if body is not None:
                self._completions(body)
        else:
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    def _chunk(self, obj: Any) -> None:
        data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _completions(self, body: dict[str, Any]) -> None:
        prompt = body.get("prompt")
        max_tokens = body.get("max_tokens", 16)
        temperature = float(body.get("temperature") or 0.0)
        if not isinstance(prompt, str) or not prompt:
            return self._json(400, {"error": {"message": "prompt must be a non-empty string"}})
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return self._json(400, {"error": {"message": "max_tokens must be an integer >= 1"}})
        if not body.get("stream"):
            return self._json(400, {"error": {"message": "only stream=true is served"}})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        m = self.model
        with m.lock:  # one request at a time
            self._generate(
                prompt, max_tokens, temperature, bool(body.get("ignore_eos")), include_usage
            )

    def _generate(
        self, prompt: str, max_tokens: int, temperature: float, ignore_eos: bool, usage: bool
    ) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList

        m = self.model
        torch = m.torch
        ids = m.encode(prompt)
        cancelled = threading.Event()

        class Cancel(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool)

        streamer = make_streamer(m.tokenizer)
        gen_kwargs: dict[str, Any] = {
            "input_ids": torch.tensor([ids]),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "max_new_tokens": max_tokens,
            "streamer": streamer,
            "pad_token_id": m.pad_id,
            "stopping_criteria": StoppingCriteriaList([Cancel()]),
        }
        if ignore_eos:
            gen_kwargs["min_new_tokens"] = max_tokens
        if temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    m.model.generate(**gen_kwargs)
            except BaseException as e:  # reported to the client below
                errors.append(e)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        cid, created, n_out = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), 0

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": m.name,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            }

        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            worker.start()
            for text, count in streamer:
                n_out = count
                if text:
                    self._chunk(chunk(text, None))
            worker.join()
            if errors:
                self._chunk({"error": {"message": f"generation failed: {errors[0]!r}"}})
            else:
                self._chunk(chunk("", "length" if n_out >= max_tokens else "stop"))
                if usage:
                    self._chunk(
                        {
                            "id": cid,
                            "object": "text_completion",
                            "created": created,
                            "model": m.name,
                            "choices": [],
                            "usage": {
                                "prompt_tokens": len(ids),
                                "completion_tokens": n_out,
                                "total_tokens": len(ids) + n_out,
                            },
                        }
                    )
                self._chunk(b"[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:  # the client went away: stop generating, then free the lock
            cancelled.set()
            for _ in streamer:
                pass
            if worker.is_alive():
                worker.join()
            self.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # a burst of concurrent clients must not overflow the backlog


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8092)
    p.add_argument(
        "--model-dir", default=None, help="HF folder (default: nurserve's default model)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = p.parse_args(argv)
    model_dir = Path(args.model_dir) if args.model_dir else default_model_dir()
    t0 = time.perf_counter()
    Handler.model = Model(model_dir, args.threads)
    print(
        f"hf-baseline: loaded {model_dir} in {time.perf_counter() - t0:.1f} s; "
        f"serving on http://{args.host}:{args.port}",
        file=sys.stderr,
        flush=True,
    )
    with Server((args.host, args.port), Handler) as srv:
        try:
            srv.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
