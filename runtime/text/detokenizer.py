"""Incremental detokenization (never emits a partial UTF-8 character) and stop-string matching.

`IncrementalDetokenizer` follows vLLM/TGI/LightLLM: it decodes a small window of ids (a prefix
already emitted, then the new ids) and releases the text past the prefix, holding it back while it
ends in U+FFFD (an incomplete character). Decoding in context of the prompt's last tokens keeps
window-start effects (a sentencepiece decoder stripping the first space) out of the stream: the
released text is `decode(tail + generated)` minus `decode(tail)`, which equals
`decode(generated)` for byte-level tokenizers.

`StopMatcher` works on the released text, so every tokenization of a stop string is matched.
When a stop string completes, the output keeps it (LightLLM v25 behaviour): the text emitted is
everything up to and including the stop string, and nothing after it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

__all__ = ["IncrementalDetokenizer", "StopMatcher"]

_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turn a stream of token ids into a stream of text chunks.

    `push(id)` returns the newly releasable text (possibly ""); `flush()` at the end returns what
    is still held (only an incomplete character, released as decode would render it). The
    concatenation of all pushes and the flush equals `tokenizer.decode(generated_ids)`.
    """

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_ids_tail: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids_tail)
        self.prefix_offset = 0  # window start: ids before it are never decoded again
        self.read_offset = len(self.ids)  # text of ids[prefix_offset:read_offset] is released
        self.generated: list[int] = []

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _pending(self) -> str:
        """Text of the ids past `read_offset`, decoded in context of the window prefix."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        return full[len(prefix) :]

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that can be released now."""
        self.ids.append(token_id)
        self.generated.append(token_id)
        new = self._pending()
        if not new or new.endswith(_REPLACEMENT):
            return ""  # nothing new yet (e.g. a skipped special token) or an incomplete character
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return new

    def flush(self) -> str:
        """Release whatever is held (called once generation ends)."""
        new = self._pending()
        self.prefix_offset = self.read_offset = len(self.ids)
        return new


class StopMatcher:
    """Find stop strings in a text stream that arrives in chunks.

    `feed(text)` returns `(emit, stopped)`: the text safe to emit now and whether a stop string
    completed. Text that may be the start of a stop string is held back until resolved. On a hit
    the emitted text ends with the stop string itself (kept, as LightLLM v25 does); the earliest
    completing stop string wins, and everything after it is dropped.
    """

    def __init__(self, stop_strings: Iterable[str]) -> None:
        self.stop_strings: list[str] = sorted({s for s in stop_strings if s}, key=len)
        self.held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that hit

    def _hold_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def feed(self, new_text: str, final: bool = False) -> tuple[str, bool]:
        """Add released text; return (text to emit, whether a stop string completed).

        With `final=True` (the sequence ends for another reason) nothing is held back.
        """
        if self.stopped:
            return "", True
        text = self.held + new_text
        end, hit = -1, None
        for s in self.stop_strings:
            i = text.find(s)
            if i >= 0 and (end < 0 or i + len(s) <= end):  # ties: the longer string
                end, hit = i + len(s), s
        if hit is not None:
            self.held, self.stopped, self.matched = "", True, hit
            return text[:end], True
        k = 0 if final else self._hold_len(text)
        self.held = text[len(text) - k :] if k else ""
        return text[: len(text) - k], False

    def flush(self) -> str:
        """Release held text at the end of a sequence that did not stop on a string."""
        out, _ = self.feed("", final=True)
        return out
