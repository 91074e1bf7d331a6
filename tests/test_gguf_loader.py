"""GGUF -> HF checkpoint: exact weights (Q/K un-permutation), config, tokenizer, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from runtime.loading.gguf_file import load_gguf
from runtime.text.tokenizer import Tokenizer

HIDDEN, N_HEAD, N_KV, HEAD_DIM, FFN, LAYERS = 64, 4, 2, 16, 96, 2
THETA = 500000.0
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "l l", "ll o"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


TOKENS = SPECIALS + _byte_alphabet() + ["Ġt", "he", "Ġthe", "ll", "llo"]
VOCAB = len(TOKENS)
SPM_PIECES = ["\u2581", "t", "h", "e", "l", "o", "\u2581t", "he", "\u2581the", "ll", "llo"]
SPM_TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute, verbatim."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def llama3_rope_factors(factor: float = 8.0) -> np.ndarray:
    """convert_hf_to_gguf's rope_freqs for Llama 3.1 (low 1, high 4, original 8192)."""
    freqs = 1.0 / (THETA ** (np.arange(0, HEAD_DIM, 2, dtype=np.float32) / HEAD_DIM))
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < 8192 / 4:
            out.append(1.0)
        elif wl > 8192:
            out.append(factor)
        else:
            s = (8192 / wl - 1) / 3
            out.append(1 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


def hf_state_dict(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)

    def r(*shape: int) -> np.ndarray:
        return g.standard_normal(shape).astype(np.float32)

    sd = {"model.embed_tokens.weight": r(VOCAB, HIDDEN), "model.norm.weight": r(HIDDEN)}
    if not tied:
        sd["lm_head.weight"] = r(VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = r(N_HEAD * HEAD_DIM, HIDDEN)
        sd[p + "self_attn.k_proj.weight"] = r(N_KV * HEAD_DIM, HIDDEN)
        sd[p + "self_attn.v_proj.weight"] = r(N_KV * HEAD_DIM, HIDDEN)
        sd[p + "self_attn.o_proj.weight"] = r(HIDDEN, N_HEAD * HEAD_DIM)
        sd[p + "mlp.gate_proj.weight"] = r(FFN, HIDDEN)
        sd[p + "mlp.up_proj.weight"] = r(FFN, HIDDEN)
        sd[p + "mlp.down_proj.weight"] = r(HIDDEN, FFN)
        sd[p + "input_layernorm.weight"] = r(HIDDEN)
        sd[p + "post_attention_layernorm.weight"] = r(HIDDEN)
    return sd


GG_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
TOP["lm_head.weight"] = "output.weight"


def gguf_name(hf: str) -> str:
    if hf in TOP:
        return TOP[hf]
    _, _, i, *rest = hf.split(".")
    return f"blk.{i}.{GG_NAMES['.'.join(rest[:-1])]}.{rest[-1]}"


def write_gguf(
    path: Path,
    sd: dict[str, np.ndarray],
    *,
    arch: str = "llama",
    quantize: tuple[str, ...] = (),
    rope_freqs: np.ndarray | None = None,
    spm: bool = False,
) -> dict[str, np.ndarray]:
    """Write `sd` as llama.cpp would; return the fp32 values the loader must give back."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(THETA)
    if spm:  # sentencepiece: byte-fallback tokens, scores, no merges, BOS by default
        w.add_tokenizer_model("llama")
        w.add_token_list(SPM_TOKENS)
        w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES))
        w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))])
        w.add_unk_token_id(0)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(TOKENS)
        w.add_token_types([3] * len(SPECIALS) + [1] * (VOCAB - len(SPECIALS)))
        w.add_token_merges(MERGES)
        w.add_add_bos_token(False)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(TEMPLATE)
    expected = {}
    for name, arr in sd.items():
        data = arr
        if name.endswith("q_proj.weight"):
            data = llama_cpp_permute(arr, N_HEAD)
        elif name.endswith("k_proj.weight"):
            data = llama_cpp_permute(arr, N_KV)
        if any(name.endswith(q) for q in quantize):
            qt = gguf.GGMLQuantizationType.Q8_0
            packed = gguf.quants.quantize(data, qt)
            w.add_tensor(gguf_name(name), packed, raw_dtype=qt)
            expected[name] = gguf.quants.dequantize(gguf.quants.quantize(arr, qt), qt)
        else:
            w.add_tensor(gguf_name(name), data)
            expected[name] = arr
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.mark.parametrize("tied", [True, False])
def test_weights_round_trip_exactly(tmp_path: Path, tied: bool) -> None:
    sd = hf_state_dict(tied)
    expected = write_gguf(tmp_path / "m.gguf", sd)
    ckpt = load_gguf(tmp_path / "m.gguf")
    assert set(ckpt.state_dict) == set(sd)
    for name, arr in expected.items():
        got = ckpt.state_dict[name]
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, torch.from_numpy(arr)), name
    cfg = ckpt.config
    assert cfg["tie_word_embeddings"] is tied
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        HIDDEN,
        N_HEAD,
        N_KV,
    )
    assert (cfg["head_dim"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (
        HEAD_DIM,
        FFN,
        LAYERS,
    )
    assert cfg["vocab_size"] == VOCAB and cfg["rope_theta"] == THETA and cfg["rms_norm_eps"] == 1e-5
    assert cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2 and "rope_scaling" not in cfg


def test_quantized_qk_unpermuted(tmp_path: Path) -> None:
    sd = hf_state_dict(tied=True, seed=1)
    expected = write_gguf(
        tmp_path / "q.gguf", sd, quantize=("q_proj.weight", "k_proj.weight", "down_proj.weight")
    )
    ckpt = load_gguf(tmp_path / "q.gguf", progress=False)
    for name, arr in expected.items():
        assert torch.equal(ckpt.state_dict[name], torch.from_numpy(arr)), name
    q = ckpt.state_dict["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert np.abs(q - sd["model.layers.0.self_attn.q_proj.weight"]).max() < 0.05  # Q8_0 error only


def test_llama3_rope_freqs_become_rope_scaling(tmp_path: Path) -> None:
    write_gguf(tmp_path / "r.gguf", hf_state_dict(tied=True), rope_freqs=llama3_rope_factors(8.0))
    ckpt = load_gguf(tmp_path / "r.gguf")
    assert ckpt.config["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert not any("rope" in k for k in ckpt.state_dict)


def test_tokenizer_and_folder(tmp_path: Path) -> None:
    write_gguf(tmp_path / "t.gguf", hf_state_dict(tied=True))
    ckpt = load_gguf(tmp_path / "t.gguf")
    ckpt.save(tmp_path / "hf")
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert names == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    }
    tcfg: dict[str, Any] = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == TEMPLATE and tcfg["eos_token"] == "<|im_end|>"
    assert tcfg["added_tokens_decoder"]["2"]["special"] is True
    tok = Tokenizer.from_dir(tmp_path / "hf")
    ids = tok.encode(" the hello")
    assert ids[0] == TOKENS.index("Ġthe") and TOKENS.index("llo") in ids
    assert tok.encode("<|im_start|>x") == [1, len(SPECIALS) + ord("x")]
    text = "Grüße, 世界 🙂 the"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_ids == [2] and tok.bos_id == 1 and tok.is_special(2) and not tok.is_special(40)


def test_sentencepiece_tokenizer(tmp_path: Path) -> None:
    write_gguf(tmp_path / "s.gguf", hf_state_dict(tied=True), spm=True)
    load_gguf(tmp_path / "s.gguf").save(tmp_path / "hf")
    tok = Tokenizer.from_dir(tmp_path / "hf")
    ids = tok.encode("the hello")
    assert ids[:2] == [1, SPM_TOKENS.index("\u2581the")]  # BOS, then merges "\u2581t" + "he"
    assert SPM_TOKENS.index("llo") in ids
    assert tok.convert_ids_to_tokens(tok.encode("é", add_special_tokens=False)) == [
        "\u2581",
        "<0xC3>",
        "<0xA9>",
    ]  # byte fallback
    # llama.cpp adds the space prefix to every text run, even one starting with a space.
    assert tok.encode(" the", add_special_tokens=False)[0] == SPM_TOKENS.index("\u2581")
    for text in ["the hello", " the  lot", "héllo 你 🙂\nok"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_ids == [2] and tok.bos_id == 1 and tok.is_special(1) and tok.is_special(0)
    assert not tok.is_special(SPM_TOKENS.index("he"))


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.gguf"
    with pytest.raises(ValueError, match="nope.gguf"):
        load_gguf(p)


def test_garbage_file(tmp_path: Path) -> None:
    p = tmp_path / "garbage.gguf"
    p.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="garbage.gguf"):
        load_gguf(p)


def test_truncated_file(tmp_path: Path) -> None:
    write_gguf(tmp_path / "full.gguf", hf_state_dict(tied=True))
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="cut.gguf"):
        load_gguf(tmp_path / "cut.gguf")


def test_unsupported_architecture(tmp_path: Path) -> None:
    write_gguf(tmp_path / "other.gguf", hf_state_dict(tied=True), arch="mamba")
    with pytest.raises(ValueError, match=r"other\.gguf.*architecture 'mamba'"):
        load_gguf(tmp_path / "other.gguf")


def test_default_model_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One conversion for concurrent callers; temp dir + rename; stale folders rebuilt."""
    import threading

    from runtime.loading import default_model as dm
    from runtime.loading import gguf_file as gguf_loader

    src = tmp_path / "src.gguf"
    write_gguf(src, hf_state_dict(tied=True))
    calls: list[int] = []
    real_load = gguf_loader.load_gguf

    def counting_load(path: Path, *, progress: bool = False) -> Any:
        calls.append(1)
        return real_load(path, progress=progress)

    monkeypatch.setenv("NURSERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dm, "_installed_gguf", lambda: src)
    monkeypatch.setattr(dm, "_check_sha256", lambda p: None)
    monkeypatch.setattr(gguf_loader, "load_gguf", counting_load)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(dm.default_model_dir(False)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = tmp_path / "cache" / dm.FOLDER_NAME
    assert results == [target] * 3 and len(calls) == 1
    assert (target / ".complete").read_text() == dm.MARKER_TEXT
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        f".{dm.FOLDER_NAME}.lock",
        dm.FOLDER_NAME,
    ]
    assert Tokenizer.from_dir(target).eos_ids == [2]

    (target / ".complete").write_text("nurserve-gguf-v0\n")  # an older conversion: rebuilt
    (tmp_path / "cache" / f".{dm.FOLDER_NAME}.tmp-crashed").mkdir()  # a crashed run's leftovers
    assert dm.default_model_dir(False) == target and len(calls) == 2
    assert (target / ".complete").read_text() == dm.MARKER_TEXT
    assert len(list((tmp_path / "cache").iterdir())) == 2

    def broken(path: Path, *, progress: bool = False) -> Any:
        raise ValueError("boom")

    monkeypatch.setattr(gguf_loader, "load_gguf", broken)
    monkeypatch.setenv("NURSERVE_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(ValueError, match="boom"):
        dm.default_model_dir(False)
    assert [p.name for p in (tmp_path / "cache2").iterdir()] == [f".{dm.FOLDER_NAME}.lock"]
