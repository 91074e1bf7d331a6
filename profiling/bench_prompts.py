"""bench_serving's prompts: the synthetic peer prompt (optionally calibrated to a token count),
the bundled or a given jsonl file, each prefixed with a unique request number; optionally behind a
shared "system prompt" of `--shared-prefix-len` tokens, and as `--multi-turn` conversations whose
turn t repeats turns 1..t-1 (with a fixed assistant reply) before a short follow-up question."""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
BUNDLED_PROMPTS = HERE / "prompts_en.jsonl"

# The prompt of the peer figures (shared reference cpu-peers.md): 65 tokens on SmolLM2.
PEER_PROMPT = (
    "Request {n:04d}. The following is a report about the history of the city library. "
    "The library was founded years ago by a group of local teachers who wanted every child in "
    "town to have access to books. Over time it grew from a single room into a large building. "
    "Write the next part of the report:"
)
PREFIX = "Request {n:04d}. "
FILLER = (
    "The following is a report about the history of the city library. The library was founded "
    "years ago by a group of local teachers who wanted every child in town to have access to "
    "books. Over time it grew from a single room into a large building."
).split()


def synthetic_prompt(n: int, words: int | None) -> str:
    """The peer prompt (words=None) or "Request NNNN. " + `words` words of the same text."""
    if words is None:
        return PEER_PROMPT.format(n=n)
    body = [FILLER[i % len(FILLER)] for i in range(words)]
    return (PREFIX.format(n=n) + " ".join(body)).rstrip()


def calibrate_words(
    target_tokens: int, count: Callable[[str], int], text: Callable[[int], str] | None = None
) -> int:
    """The most words whose `text(words)` (default: the synthetic prompt) has at most
    `target_tokens` tokens."""
    make = text or (lambda words: synthetic_prompt(1, words))
    lo, hi = 0, max(4, 2 * target_tokens)
    while count(make(hi)) <= target_tokens:  # make sure hi is over the target
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(make(mid)) <= target_tokens:
            lo = mid
        else:
            hi = mid
    return lo


# The shared "system prompt" of --shared-prefix-len: words unlike the prompts' own text, in a
# fixed pseudo-random order (the same on every run).
SYSTEM_WORDS = (
    "assistant careful polite answer question user detail example policy language clear "
    "brief friendly accurate source context format summary reason step helpful safe topic"
).split()
REPLY = (
    "Thank you for the question. Here is a short answer with the main points, and I can add "
    "more detail about any of them if you would like."
)


FOLLOW_UP = "Thanks. Could you say more about point {t}, in two sentences?"


def shared_prefix(words: int) -> str:
    """ "System: " + `words` words of the fixed system-prompt text, ending in a newline."""
    rng = random.Random(1234)
    return "System: " + " ".join(rng.choice(SYSTEM_WORDS) for _ in range(words)) + ".\n"


def conversation_turn(questions: list[str], conv: int, turn: int) -> str:
    """Turn `turn` (0-based) of conversation `conv`: its first message is prompt `conv` (the long
    one: a document and a question), each later turn adds a fixed assistant reply and a short
    follow-up question; a turn's prompt starts with the previous turn's."""
    text = f"Conversation {conv:04d}.\nUser: {questions[conv % len(questions)]}\nAssistant:"
    for t in range(1, turn + 1):
        text += f" {REPLY}\nUser: {FOLLOW_UP.format(t=t)}\nAssistant:"
    return text


def _shape_prompts(args: argparse.Namespace, prompts: list[str], info: dict[str, Any]) -> list[str]:
    """Apply --multi-turn and --shared-prefix-len to the plain prompts (updates `info`)."""
    turns = getattr(args, "multi_turn", 1) or 1
    if turns > 1:
        warm = getattr(args, "warmup", 0)
        out = prompts[:warm]
        for i in range(len(prompts) - warm):  # level-local order: conversation i // turns
            conv, turn = divmod(i, turns)
            out.append(conversation_turn(prompts[warm:], conv, turn))
        prompts = out
        info["multi_turn"] = turns
    target = getattr(args, "shared_prefix_len", None)
    if target:
        count, how = make_token_counter(args)
        words = calibrate_words(target, count, shared_prefix)
        prefix = shared_prefix(words)
        info.update(shared_prefix_len=target, shared_prefix_tokens=count(prefix))
        info.setdefault("counted_by", how)
        prompts = [prefix + p for p in prompts]
    return prompts


def load_jsonl_prompts(path: Path) -> list[str]:
    """`{"prompt": str}` (or `{"text": str}`) lines."""
    prompts = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else obj
            if not isinstance(text, str) or not text:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'prompt' string")
            prompts.append(text)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def make_token_counter(args: argparse.Namespace) -> tuple[Callable[[str], int], str]:
    """A prompt-token counter: a local tokenizer file, else the server's tokenize endpoint."""
    if args.tokenizer:
        from tokenizers import Tokenizer

        p = Path(args.tokenizer)
        tok = Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))
        return (lambda text: len(tok.encode(text).ids)), f"tokenizer {p}"
    base = args.base_url.rstrip("/")
    client = httpx.Client(timeout=60.0, trust_env=False)
    if args.backend == "nurserve":

        def count(text: str) -> int:
            r = client.post(f"{base}/tokens", json={"text": text, "parameters": {}})
            r.raise_for_status()
            return int(r.json()["ntokens"])

        return count, f"{base}/tokens"

    def count_openai(text: str) -> int:  # llama.cpp (content) and vLLM (prompt) /tokenize
        body: dict[str, Any] = {"content": text, "prompt": text, "add_special": True}
        if args.model:
            body["model"] = args.model
        r = client.post(f"{base}/tokenize", json=body)
        r.raise_for_status()
        obj = r.json()
        return int(obj["count"]) if "count" in obj else len(obj["tokens"])

    return count_openai, f"{base}/tokenize"


def build_prompts(args: argparse.Namespace, total: int) -> tuple[list[str], dict[str, Any]]:
    """`total` prompts with unique request numbers, and a description for the result JSON."""
    prompts, info = _plain_prompts(args, total)
    return _shape_prompts(args, prompts, info), info


def _plain_prompts(args: argparse.Namespace, total: int) -> tuple[list[str], dict[str, Any]]:
    """The prompts before --shared-prefix-len and --multi-turn."""
    if args.dataset == "synthetic":
        if args.input_len is None:
            return [synthetic_prompt(n, None) for n in range(total)], {
                "dataset": "synthetic",
                "prompt": "peer prompt (cpu-peers.md), 65 tokens on SmolLM2",
            }
        count, how = make_token_counter(args)
        words = calibrate_words(args.input_len, count)
        got = count(synthetic_prompt(1, words))
        if got != args.input_len:
            print(
                f"note: synthetic prompts have {got} tokens (asked {args.input_len}); "
                "the server's counts are reported",
                file=sys.stderr,
            )
        return [synthetic_prompt(n, words) for n in range(total)], {
            "dataset": "synthetic",
            "input_len": args.input_len,
            "calibrated_tokens": got,
            "filler_words": words,
            "counted_by": how,
        }
    path = BUNDLED_PROMPTS if args.dataset == "bundled" else Path(args.dataset)
    base = load_jsonl_prompts(path)
    rng = random.Random(args.seed)
    order = list(range(len(base)))
    rng.shuffle(order)
    prompts = [PREFIX.format(n=n) + base[order[n % len(base)]] for n in range(total)]
    return prompts, {"dataset": str(path.name if args.dataset == "bundled" else path)}


__all__ = [
    "BUNDLED_PROMPTS",
    "PEER_PROMPT",
    "build_prompts",
    "calibrate_words",
    "conversation_turn",
    "load_jsonl_prompts",
    "make_token_counter",
    "shared_prefix",
    "synthetic_prompt",
]
