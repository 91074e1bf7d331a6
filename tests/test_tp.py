"""Tensor parallelism (`--tp 2` over gloo on the CPU) on the default model: the same logits as
`--tp 1` to fp32 rounding and the same greedy tokens; a real server answers at `--tp 2`; a
worker's `kill -9` ends the server (status 3) within seconds and leaves no process behind; the
end of rank 0 ends its worker."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from runtime.engine.args import EngineArgs
from runtime.engine.loader import load_runner
from runtime.model.batch import SeqChunk
from runtime.model.config import CheckpointError, ModelConfig
from runtime.model.runner import ModelRunner
from runtime.parallel.shard import ShardSpec, split_range
from runtime.text.tokenizer import Tokenizer
from tests.server_helpers import ServerProcess, start_server

PROMPTS = ["What is AI?", "Write a haiku about the sea.", "1, 2, 3, 4,"]
DECODE_STEPS = 6
EXIT_WITHIN_S = 10.0  # generous for a shared 2-core CI machine


def _greedy(runner: ModelRunner, tok: Tokenizer) -> tuple[list[torch.Tensor], list[list[int]]]:
    """All prompts prefilled in one batch, then DECODE_STEPS batched greedy decodes: the logits
    of every step and each prompt's tokens."""
    prompts = [tok.encode(p) for p in PROMPTS]
    width = max(len(p) for p in prompts) + DECODE_STEPS + 1
    slots = [list(range(i * width, (i + 1) * width)) for i in range(len(prompts))]
    chunks = [SeqChunk(p, 0, s) for p, s in zip(prompts, slots, strict=True)]
    seqs = [list(p) for p in prompts]
    all_logits = []
    for _ in range(DECODE_STEPS):
        logits = runner.logits(runner.run(runner.prepare(chunks))).clone()  # [B, V]
        all_logits.append(logits)
        for seq, t in zip(seqs, logits.argmax(-1).tolist(), strict=True):
            seq.append(t)
        chunks = [SeqChunk([q[-1]], len(q) - 1, s) for q, s in zip(seqs, slots, strict=True)]
    return all_logits, [q[len(p) :] for q, p in zip(seqs, prompts, strict=True)]


def test_tp2_logits_and_greedy_tokens_match_tp1() -> None:
    """fp32 at --tp 2 (uneven head split 6+3 / 2+1 KV) equals --tp 1 to fp32 rounding."""
    results = []
    threads = torch.get_num_threads()  # --tp 2 gives this process cores / 2: restored after
    for tp in (1, 2):
        runner, tok = load_runner(
            EngineArgs(tp=tp, quant_type="none", data_type="fp32", max_total_token_num=256)
        )
        try:
            results.append(_greedy(runner, tok))
        finally:
            runner.close()
            torch.set_num_threads(threads)
    (ref_logits, ref_tokens), (tp_logits, tp_tokens) = results
    assert tp_tokens == ref_tokens
    for ref, got in zip(ref_logits, tp_logits, strict=True):
        assert got.shape == ref.shape == (len(PROMPTS), 49152)
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-4)


def test_shard_spec_split_by_kv_group() -> None:
    cfg = ModelConfig.from_hf_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 576,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "num_hidden_layers": 2,
            "intermediate_size": 1536,
            "vocab_size": 49153,
        }
    )
    a, b = (ShardSpec.for_rank(cfg, r, 2) for r in (0, 1))
    assert (a.q_heads, a.kv_heads, b.q_heads, b.kv_heads) == ((0, 6), (0, 2), (6, 9), (2, 3))
    assert a.vocab_widths == (24577, 24576) and b.vocab == (24577, 49153)
    assert [split_range(10, 3, i) for i in range(3)] == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError, match="at most the number of KV heads"):
        ShardSpec.for_rank(cfg, 0, 4)


def test_tp_refuses_quantized_weights() -> None:
    with pytest.raises(CheckpointError, match="--tp 2 needs dense weights"):
        load_runner(EngineArgs(tp=2, quant_type="q8_0", device="cpu"))


def _children(pid: int) -> list[int]:
    """Live child processes of `pid` (from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid and stat[0] != "Z":
                kids.append(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def tp_server() -> Iterator[tuple[ServerProcess, int]]:
    """A real `python -m server --tp 2` (the default fp16-weights mode) and its worker's pid."""
    srv = start_server(["--tp", "2", "--max_total_token_num", "2048"])
    try:
        workers = _children(srv.proc.pid)
        assert len(workers) == 1, workers
        yield srv, workers[0]
    finally:
        srv.stop(timeout_s=10)


def test_server_tp2_generates_and_dies_with_its_worker(
    tp_server: tuple[ServerProcess, int],
) -> None:
    srv, worker = tp_server
    body = {"inputs": "What is AI?", "parameters": {"max_new_tokens": 12}}
    r = httpx.post(srv.base_url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["count_output_tokens"] == 12 and r.json()["generated_text"][0].strip()
    os.kill(worker, signal.SIGKILL)  # while the engine idles: the watch thread sees it
    start = time.monotonic()
    assert srv.wait(timeout_s=EXIT_WITHIN_S) == 3  # ~2 s here: 0.1 s poll, 0.5 s of 503s, exit
    assert time.monotonic() - start < EXIT_WITHIN_S
    assert not _alive(worker)
    assert "tp worker rank 1" in srv.log_text()


@pytest.mark.slow
def test_worker_killed_mid_stream(tp_server: tuple[ServerProcess, int]) -> None:
    """Mid-step, rank 0's next collective fails at once: the stream ends with an error event."""
    srv, worker = tp_server
    body = {"inputs": "Tell me a story.", "parameters": {"max_new_tokens": 400, "ignore_eos": True}}
    events = []
    with httpx.stream("POST", srv.base_url + "/generate_stream", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if len(events) == 3:
                    os.kill(worker, signal.SIGKILL)
    assert len(events) < 400 and "error" in json.dumps(events[-1]).lower()
    assert srv.wait(timeout_s=EXIT_WITHIN_S) == 3


@pytest.mark.slow
def test_rank0_death_ends_the_worker(tp_server: tuple[ServerProcess, int]) -> None:
    srv, worker = tp_server
    srv.proc.kill()
    srv.proc.wait(timeout=5)
    deadline = time.monotonic() + 5
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)
