"""Score requests in the continuous batch: same score alone and among 32 others; slots freed."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.engine.api import ScoreEvent
from runtime.engine.args import EngineArgs
from runtime.engine.core import EngineCore, Request
from runtime.engine.loader import load_runner
from runtime.sampling.params import SamplingParams
from tests.server_helpers import make_tiny_reward_checkpoint

SEED_CHAT = (
    "<|im_start|>user\nHello! What's your name?<|im_end|>\n<|im_start|>assistant\n"
    "My name is InternLM2! A helpful AI assistant. What can I do for you?<|im_end|>\n<|reward|>"
)


def score_all(core: EngineCore, prompts: list[list[int]], arrivals: list[int]) -> list[float]:
    reqs: list[Request | None] = [None] * len(prompts)
    scores: list[float] = [float("nan")] * len(prompts)
    step = 0
    while not all(r is not None and r.done for r in reqs):
        for i, at in enumerate(arrivals):
            if at == step:
                reqs[i] = core.new_request(
                    i, prompts[i], SamplingParams(max_new_tokens=1), score=True
                )
                core.submit(reqs[i])  # type: ignore[arg-type]
        for req, ev in core.step():
            assert isinstance(ev, ScoreEvent)
            scores[reqs.index(req)] = ev.score
            assert ev.prompt_tokens == len(prompts[reqs.index(req)])
        step += 1
    assert core.scheduler.allocator.num_used == 0
    return scores


@pytest.mark.parametrize("kind", ["internlm2_reward", "qwen2_reward", "llama_seq_cls"])
def test_score_alone_equals_score_in_batch(tmp_path: Path, kind: str) -> None:
    folder = make_tiny_reward_checkpoint(tmp_path, kind)
    args = EngineArgs(model_dir=str(folder), max_total_token_num=8192, batch_max_tokens=128)
    runner, tok = load_runner(args)
    core = EngineCore(runner, tok, args)
    chat = tok.encode(SEED_CHAT)
    others = [
        tok.encode(
            f"<|im_start|>user\nquestion {i} " + "word " * (i * 3) + "<|im_end|>\n<|reward|>"
        )
        for i in range(31)
    ]
    alone = score_all(core, [chat], [0])[0]
    batch = score_all(core, [*others[:10], chat, *others[10:]], [i % 4 for i in range(32)])
    assert abs(batch[10] - alone) <= 1e-5
    assert len(set(batch)) > 1
