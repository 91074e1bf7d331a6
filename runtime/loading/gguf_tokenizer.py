"""The tokenizer of a GGUF file: `tokenizer.json`, `tokenizer_config.json` and the special ids
rebuilt from its `tokenizer.ggml.*` metadata (byte-level BPE "gpt2", sentencepiece-BPE "llama")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> how text is split before BPE.
_PRE_DIGITS = {"smollm", "starcoder", "refact"}  # Digits(individual) + GPT-2 ByteLevel regex
_PRE_GPT2 = {"default", "gpt-2", "gpt2"}  # GPT-2 ByteLevel regex only
_PRE_LLAMA3 = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe"}  # Llama 3 split regex
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4  # tokenizer.ggml.token_type values


def req_key(meta: dict[str, Any], key: str, path: str | Path) -> Any:
    if key not in meta:
        raise ValueError(f"{path}: missing GGUF key {key!r}")
    return meta[key]


def _special_ids(meta: dict[str, Any]) -> dict[str, int]:
    """Special token ids the file names (ids outside the vocabulary are ignored)."""
    n = len(meta.get("tokenizer.ggml.tokens") or ())
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id"}
    keys |= {"pad": "padding_token_id", "eot": "eot_token_id", "eom": "eom_token_id"}
    return {
        k: int(meta[f"tokenizer.ggml.{v}"])
        for k, v in keys.items()
        if 0 <= int(meta.get(f"tokenizer.ggml.{v}", -1)) < n
    }


def _spm_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a sentencepiece vocabulary: every split of a token into two tokens,
    ranked by the merged token's score (as transformers' `generate_merges`)."""
    merges: list[tuple[str, str, float]] = []
    for tok, i in vocab.items():
        local = [(tok[:k], tok[k:], scores[i]) for k in range(1, len(tok))]
        local = [m for m in local if m[0] in vocab and m[1] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _gpt2_tokenizer(
    meta: dict[str, Any], vocab: dict[str, int], path: Path
) -> tuple[Any, list[Any], bool]:
    """Byte-level BPE ("gpt2"): (tokenizer, post-processors, BOS by default)."""
    from tokenizers import Regex, Tokenizer, decoders, models, processors
    from tokenizers import pre_tokenizers as pt

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _PRE_DIGITS:
        pre_tok: Any = pt.Sequence(
            [pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]
        )
    elif pre in _PRE_GPT2:
        pre_tok = pt.ByteLevel(add_prefix_space=False)
    elif pre in _PRE_LLAMA3:
        pre_tok = pt.Sequence(
            [
                pt.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pt.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise ValueError(f"{path}: unsupported tokenizer.ggml.pre {pre!r}")
    merges = [tuple(m.split(" ", 1)) for m in req_key(meta, "tokenizer.ggml.merges", path)]
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in _PRE_LLAMA3))
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    return tok, [processors.ByteLevel(trim_offsets=False)], pre in _PRE_LLAMA3


def _spm_tokenizer(
    meta: dict[str, Any], vocab: dict[str, int], tokens: list[str], ids: dict[str, int], path: Path
) -> tuple[Any, list[Any], bool]:
    """Sentencepiece BPE ("llama"): (tokenizer, post-processors, BOS by default)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = list(req_key(meta, "tokenizer.ggml.scores", path))
    unk = tokens[ids["unk"]] if "unk" in ids else None
    tok = Tokenizer(
        models.BPE(
            vocab, _spm_merges(vocab, scores), unk_token=unk, fuse_unk=True, byte_fallback=True
        )
    )
    space = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm = [normalizers.Replace(" ", "\u2581")]
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), *norm] if space else norm)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence([*dec, decoders.Strip(" ", 1, 0)] if space else dec)
    return tok, [], True


def _build_tokenizer(meta: dict[str, Any], path: Path) -> tuple[Any, bool, bool]:
    """(`tokenizers.Tokenizer`, add_bos, add_eos) from the `tokenizer.ggml.*` metadata."""
    from tokenizers import AddedToken, processors

    kind = req_key(meta, "tokenizer.ggml.model", path)
    tokens = list(req_key(meta, "tokenizer.ggml.tokens", path))
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):  # keep ids contiguous even if the file repeats a token
        if t in vocab:
            tokens[i] = t = f"<unused_dup_{i}>"
        vocab[t] = i
    ids = _special_ids(meta)
    if kind == "gpt2":
        tok, post, add_bos_default = _gpt2_tokenizer(meta, vocab, path)
    elif kind == "llama":
        tok, post, add_bos_default = _spm_tokenizer(meta, vocab, tokens, ids, path)
    else:
        raise ValueError(
            f"{path}: unsupported tokenizer.ggml.model {kind!r} (supported: gpt2, llama)"
        )
    special = [t for t, ty in zip(tokens, types, strict=False) if ty in (_UNKNOWN, _CONTROL)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, ty in zip(tokens, types, strict=False) if ty == _USER_DEFINED]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and "bos" in ids
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and "eos" in ids
    if add_bos or add_eos:
        b = f"{tokens[ids['bos']]}:0 " if add_bos else ""
        e = f" {tokens[ids['eos']]}:0" if add_eos else ""
        pairs = [(tokens[ids[k]], ids[k]) for k, on in (("bos", add_bos), ("eos", add_eos)) if on]
        post.append(
            processors.TemplateProcessing(
                single=f"{b}$A:0{e}",
                pair=f"{b}$A:0{e} {b.replace(':0', ':1')}$B:1{e.replace(':0', ':1')}",
                special_tokens=pairs,
            )
        )
    if post:
        tok.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)
    return tok, add_bos, add_eos


def tokenizer_files(
    meta: dict[str, Any], path: Path
) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(tokenizer.json text, tokenizer_config, generation_config, config special-id entries)."""
    tok, add_bos, add_eos = _build_tokenizer(meta, path)
    ids = _special_ids(meta)
    tokens = meta["tokenizer.ggml.tokens"]
    decoder = {
        str(i): {
            "content": a.content,
            "lstrip": a.lstrip,
            "normalized": a.normalized,
            "rstrip": a.rstrip,
            "single_word": a.single_word,
            "special": a.special,
        }
        for i, a in sorted(tok.get_added_tokens_decoder().items())
    }
    tcfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get("llama.context_length", 4096)),
        "added_tokens_decoder": decoder,
    }
    for k in ("bos", "eos", "unk", "pad"):
        if k in ids:
            tcfg[f"{k}_token"] = tokens[ids[k]]
    if "tokenizer.chat_template" in meta:
        tcfg["chat_template"] = meta["tokenizer.chat_template"]
    eos = list(dict.fromkeys(ids[k] for k in ("eos", "eot", "eom") if k in ids))
    special_cfg: dict[str, Any] = {}
    if "bos" in ids:
        special_cfg["bos_token_id"] = ids["bos"]
    if eos:
        special_cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    gen = dict(special_cfg)
    if "pad" in ids:
        special_cfg["pad_token_id"] = ids["pad"]
    return tok.to_str(), tcfg, gen, special_cfg
