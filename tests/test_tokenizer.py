"""The default model's HF folder vs transformers, and `Tokenizer` (encode/decode/chat template)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from runtime.loading.default_model import default_model_dir as get_default_model_dir
from runtime.text.tokenizer import Tokenizer, render_chat_template

TEXTS = [
    "Hello, world! How are you today?",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "12345",
    "Pi is 3.14159 and 2024-01-01 was a Monday.",
    "你好，世界",
    "🙂👍🏽",
    "  leading spaces,\ttabs\n\nand  double  spaces ",
    "Ünïcödé façade naïve — “quotes” ‘single’ …",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "",
]
CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "你好 🙂"},
    ],
]


@pytest.fixture(scope="module")
def hf_tokenizer(default_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def tok(default_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


def test_folder_layout(default_model_dir: Path) -> None:
    names = {p.name for p in default_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert {"generation_config.json", ".complete"} <= names
    cfg = json.loads((default_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (576, 30, 49152)
    tcfg = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tcfg["chat_template"]


def test_cached_load_is_fast(default_model_dir: Path) -> None:
    t0 = time.perf_counter()
    assert get_default_model_dir(progress=False) == default_model_dir
    assert time.perf_counter() - t0 < 2.0


def test_transformers_loads_and_answers(default_model_dir: Path, hf_tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(default_model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.tie_word_embeddings
    prompt = hf_tokenizer.apply_chat_template(CHATS[0], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([hf_tokenizer(prompt + "The capital of France is").input_ids])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster than 2 on a shared 2-core machine
    try:
        with torch.inference_mode():  # one forward: a wrong Q/K permutation would not answer this
            nxt = int(model(ids, logits_to_keep=1).logits[0, -1].argmax())
    finally:
        torch.set_num_threads(threads)
    assert hf_tokenizer.decode([nxt]) == " Paris"


@pytest.mark.parametrize("add_special", [True, False])
def test_encode_matches_transformers(tok: Tokenizer, hf_tokenizer: Any, add_special: bool) -> None:
    for text in TEXTS:
        ours = tok.encode(text, add_special_tokens=add_special)
        assert ours == hf_tokenizer(text, add_special_tokens=add_special).input_ids, text
        assert tok.decode(ours, skip_special_tokens=False) == text
        assert tok.decode(ours) == hf_tokenizer.decode(ours, skip_special_tokens=True)
    assert tok.encode("12345") == [tok.token_to_id(c) for c in "12345"]  # digits split singly


def test_chat_template_matches_transformers(tok: Tokenizer, hf_tokenizer: Any) -> None:
    for chat in CHATS:
        for gen in (True, False):
            ours = tok.apply_chat_template(chat, add_generation_prompt=gen)
            ref = hf_tokenizer.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert ours == ref
            assert tok.encode(ours) == hf_tokenizer(ref).input_ids
    assert tok.apply_chat_template(CHATS[0]).endswith("<|im_start|>assistant\n")


def test_special_tokens(tok: Tokenizer, hf_tokenizer: Any) -> None:
    assert tok.bos_id == hf_tokenizer.bos_token_id == 1
    assert tok.eos_ids == [2] and hf_tokenizer.eos_token_id == 2
    assert tok.vocab_size == 49152
    assert tok.is_special(2) and tok.is_special(0) and not tok.is_special(1000)
    assert tok.id_to_token(2) == "<|im_end|>"
    assert tok.convert_ids_to_tokens([1, 19556]) == hf_tokenizer.convert_ids_to_tokens([1, 19556])
    assert tok.decode([19556, 2, 905]) == "Hello world"
    assert tok.decode([19556, 2, 905], skip_special_tokens=False) == "Hello<|im_end|> world"


def test_add_bos_token_from_config(tmp_path: Path, default_model_dir: Path) -> None:
    shutil.copy(default_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    tcfg = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    tcfg["add_bos_token"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tcfg))
    t = Tokenizer.from_dir(tmp_path)
    assert t.encode("Hello") == [1, 19556] and t.encode("Hello", add_special_tokens=False) == [
        19556
    ]
    assert t.eos_ids == [2]  # no generation_config.json: tokenizer_config's eos


def test_template_helpers() -> None:
    from jinja2.exceptions import SecurityError, TemplateError

    tpl = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
        "{% for m in messages %}{% generation %}{{ m | tojson }}{% endgeneration %}\n"
        "{% if loop.index > 0 %}{% break %}{% endif %}{% endfor %}{{ bos_token }}"
    )
    out = render_chat_template(tpl, messages=[{"role": "user", "content": "é"}], bos_token="<s>")
    assert out == '{"role": "user", "content": "é"}<s>'  # trim_blocks ate the newline
    with pytest.raises(TemplateError, match="user first"):
        render_chat_template(tpl, messages=[{"role": "system", "content": ""}], bos_token="")
    with pytest.raises(SecurityError):
        render_chat_template("{{ messages.append(1) }}", messages=[])


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
