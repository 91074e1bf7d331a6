"""`Tokenizer`: the Rust `tokenizers` backend plus a jinja2 chat template, read from an HF folder.

Decoding does not apply transformers' `clean_up_tokenization_spaces` (so the incremental
detokenizer's stream always equals `decode`); every tokenizer this project ships sets it false.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend

__all__ = ["Tokenizer", "render_chat_template"]


def _token_str(value: Any) -> str | None:
    """A special token from tokenizer_config: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _chat_template(folder: Path, tcfg: Mapping[str, Any]) -> str | None:
    """The default chat template: tokenizer_config's, else chat_template.jinja / .json."""
    tpl = tcfg.get("chat_template")
    if tpl is None and (folder / "chat_template.jinja").is_file():
        tpl = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if tpl is None:
        tpl = _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(tpl, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) else None


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _generation_ext() -> type:
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag) as a no-op."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_render", [])
            return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return str(caller())

    return GenerationTag


def render_chat_template(template: str, **variables: Any) -> str:
    """Render a chat template the way transformers does (sandboxed, trim/lstrip blocks)."""
    from jinja2 import ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols, _generation_ext()]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template).render(**variables)


class Tokenizer:
    """Encode/decode with a `tokenizers.Tokenizer`; chat templates with jinja2."""

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        eos_ids: Iterable[int] = (),
        add_bos_token: bool | None = None,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_id = self._id(bos_token)
        self.pad_id = self._id(pad_token)
        ids = [self._id(eos_token), *eos_ids]
        self.eos_ids: list[int] = list(dict.fromkeys(i for i in ids if i is not None))
        self.special_tokens = dict(special_tokens or {})  # extra template variables
        added = backend.get_added_tokens_decoder()
        self._special: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        # Prepend BOS ourselves only when the config asks for it and the backend does not do it.
        probe = backend.encode("a", add_special_tokens=True).ids
        self._prepend_bos = bool(add_bos_token) and self.bos_id is not None
        self._prepend_bos &= not probe or probe[0] != self.bos_id

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json and tokenizer_config.json from a folder (EOS ids of generation:
        `runtime.engine.loader.resolve_generation`)."""
        folder = Path(path)
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise ValueError(
                f"{folder}: no tokenizer.json (sentencepiece-only tokenizers need converting first)"
            )
        backend = _Backend.from_file(str(tj))
        tcfg = _read_json(folder / "tokenizer_config.json")
        specials = {
            k: s
            for k in ("bos_token", "eos_token", "pad_token", "unk_token")
            if (s := _token_str(tcfg.get(k))) is not None
        }
        return cls(
            backend,
            bos_token=specials.get("bos_token"),
            eos_token=specials.get("eos_token"),
            pad_token=specials.get("pad_token"),
            add_bos_token=tcfg.get("add_bos_token"),
            chat_template=_chat_template(folder, tcfg),
            special_tokens=specials,
        )

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (with BOS/EOS per the tokenizer's post-processor if asked)."""
        ids: list[int] = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos:
            ids.insert(0, self.bos_id)  # type: ignore[arg-type]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens dropped when `skip_special_tokens`."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of one id (None if out of range)."""
        return self.backend.id_to_token(token_id)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        """Vocabulary strings of `ids`."""
        return [self.backend.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary string, or None."""
        return self.backend.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a special added token (control token such as `<|im_end|>`)."""
        return token_id in self._special

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render `messages` with the chat template (jinja2, as transformers renders it)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        variables: dict[str, Any] = {
            "bos_token": "",
            "eos_token": "",
            "tools": None,
            "documents": None,
        }
        variables.update(self.special_tokens)
        variables.update(kwargs)
        variables.update(messages=messages, add_generation_prompt=add_generation_prompt)
        return render_chat_template(self.chat_template, **variables)
