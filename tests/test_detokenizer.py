"""IncrementalDetokenizer (no partial UTF-8 ever emitted) and StopMatcher (stop strings on text)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from runtime.text.detokenizer import IncrementalDetokenizer, StopMatcher
from runtime.text.tokenizer import Tokenizer

MULTIBYTE = [
    "你好，世界！今天天气很好。",
    "🙂👍🏽🎉 emoji ok",
    "Ünïcödé — “quotes” 東京タワー",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√",
]


@pytest.fixture(scope="module")
def tok(default_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


def stream(
    tok: Tokenizer, ids: list[int], tail: list[int] | None = None, skip: bool = True
) -> list[str]:
    detok = IncrementalDetokenizer(tok, tail or [], skip_special_tokens=skip)
    chunks = [detok.push(i) for i in ids]
    return [*chunks, detok.flush()]


@pytest.mark.parametrize("text", MULTIBYTE)
def test_no_partial_characters(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    # The case under test: single tokens that hold only part of a character.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    for tail in (None, tok.encode("<|im_start|>assistant\n")[-5:]):
        chunks = stream(tok, ids, tail)
        assert not any("\ufffd" in c for c in chunks)
        assert chunks[-1] == ""  # nothing held back at the end of valid text
        assert "".join(chunks) == tok.decode(ids) == text


def test_chunks_arrive_promptly(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world, this is plain ASCII.", add_special_tokens=False)
    chunks = stream(tok, ids)
    assert all(chunks[:-1]) and chunks[-1] == ""  # every ASCII token releases its text at once


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok: Tokenizer, skip: bool) -> None:
    ids = tok.encode("Hi 你好<|im_end|>\n<|im_start|>user 🙂", add_special_tokens=False)
    chunks = stream(tok, ids, skip=skip)
    assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in "".join(chunks)) is not skip


def test_random_ids_concatenate_to_decode(tok: Tokenizer) -> None:
    rng = random.Random(1234)
    for n in range(60):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 25))]
        skip = n % 2 == 0
        chunks = stream(tok, ids, skip=skip)
        assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip)
        assert not any(c.endswith("\ufffd") for c in chunks[:-1])  # only flush may end mid-char


def test_truncated_character_released_by_flush(tok: Tokenizer) -> None:
    ids = tok.encode("ok 你好，世界", add_special_tokens=False)
    k = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    parts = [detok.push(i) for i in ids[:k]]  # the rest of the character never comes
    rest = detok.flush()
    assert not any("\ufffd" in p for p in parts) and rest.endswith("\ufffd")
    assert "".join(parts) + rest == tok.decode(ids[:k]) and "".join(parts).startswith("ok")


def feed_all(m: StopMatcher, chunks: list[str]) -> tuple[str, bool]:
    out, stopped = [], False
    for c in chunks:
        text, stopped = m.feed(c)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    return "".join(out), stopped


def test_stop_across_chunks() -> None:
    m = StopMatcher(["world"])
    assert m.feed("Hello wo") == ("Hello ", False)  # "wo" held: it may start "world"
    assert m.feed("rld! more") == ("world", True)  # stop text kept, the rest dropped
    assert m.feed("ignored") == ("", True) and m.matched == "world"


def test_overlapping_prefixes() -> None:
    m = StopMatcher(["abc", "ab"])
    assert m.feed("xa") == ("x", False)
    assert m.feed("bc") == ("ab", True) and m.matched == "ab"  # "ab" completes first
    m = StopMatcher(["bcd", "abc"])
    assert feed_all(m, ["a", "b", "c", "d"]) == ("abc", True)
    m = StopMatcher(["aab"])
    assert m.feed("aa") == ("", False) and m.feed("ab") == ("aaab", True)


def test_no_false_holds() -> None:
    m = StopMatcher(["</s>", "STOP"])
    assert m.feed("plain text") == ("plain text", False)  # no suffix could start a stop string
    assert m.feed(" ends with S") == (" ends with ", False)
    assert m.flush() == "S" and m.flush() == ""
    m = StopMatcher(["STOP"])
    assert m.feed("partial ST", final=True) == ("partial ST", False)
    assert StopMatcher([]).feed("anything") == ("anything", False)
    assert StopMatcher([""]).feed("x") == ("x", False)


def test_stop_tokenised_differently(tok: Tokenizer) -> None:
    stop = "Paris."
    pieces = [
        ["The capital is Paris. Next"],
        ["The capital is Par", "is", ". Next"],
        ["The capital is P", "aris", ".", " Next"],
    ]
    seen = set()
    for parts in pieces:
        ids = [i for p in parts for i in tok.encode(p, add_special_tokens=False)]
        seen.add(tuple(ids))
        detok, m = IncrementalDetokenizer(tok, [], skip_special_tokens=True), StopMatcher([stop])
        out, stopped = "", False
        for i in ids:
            text, stopped = m.feed(detok.push(i))
            out += text
            if stopped:
                break
        assert stopped and out == "The capital is Paris."
    assert len(seen) == 3  # really three different token sequences


def test_stop_matcher_fuzz() -> None:
    rng = random.Random(7)
    for _ in range(400):
        stops = [
            "".join(rng.choice("abc") for _ in range(rng.randint(1, 4)))
            for _ in range(rng.randint(1, 3))
        ]
        full = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(len(full) + 1), k=min(len(full) + 1, rng.randint(0, 6))))
        chunks = [full[a:b] for a, b in zip([0, *cuts], [*cuts, len(full)], strict=True)]
        ends = [full.find(s) + len(s) for s in stops if s in full]
        expect = (full[: min(ends)], True) if ends else (full, False)
        assert feed_all(StopMatcher(stops), chunks) == expect, (stops, chunks)
