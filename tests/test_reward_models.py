"""Reward models end to end on tiny checkpoints: transformers / numpy parity, and the reward-head twin.

`make_tiny_reward_checkpoint(tmp_path, kind)` and `tiny_reward_score(folder, ids)` are meant to be
imported by other tests (e.g. the HTTP ones) to serve a real tiny reward checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from cuda import reward_head
from runtime.loading.hf_folder import load_model
from runtime.model import reward
from runtime.model.batch import ForwardBatch, SeqChunk, make_forward_batch
from runtime.model.kv_pool import KVPool
from runtime.model.llama import CausalLM

# kind -> (architecture, layout); layout "hf" = Llama names, "internlm2" = packed wqkv
REWARD_KINDS: dict[str, tuple[str, str]] = {
    "llama_seq_cls": ("LlamaForSequenceClassification", "hf"),
    "mistral_seq_cls": ("MistralForSequenceClassification", "hf"),
    "qwen2_seq_cls": ("Qwen2ForSequenceClassification", "hf"),
    "internlm2_reward": ("InternLM2ForRewardModel", "internlm2"),
    "qwen2_reward": ("Qwen2ForRewardModel", "hf"),
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|reward|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
)
SEQS = [[5, 17, 88, 3, 250, 9, 41, 77, 13, 2, 61], [100, 7, 7, 300, 19]]


# ---- tiny checkpoints ------------------------------------------------------------------------
def _write_tokenizer(folder: Path) -> tuple[int, int | None, int | None]:
    """The default model's tokenizer if it is already converted, else a byte-level BPE.

    Returns (size with added tokens, id of `<|im_end|>`, id of `<|endoftext|>`).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from runtime.loading import default_model

    src = default_model.cache_root() / default_model.FOLDER_NAME
    if (src / ".complete").is_file() and (src / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (src / name).is_file():
                shutil.copy(src / name, folder / name)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    else:
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
        )
        tok.save(str(folder / "tokenizer.json"))
        tcfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHATML,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=1))
    size = tok.get_vocab_size(with_added_tokens=True)
    return size, tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")


def _random_body(cfg: dict, layout: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights (non-trivial norms) for a Llama-family body under `layout`'s names."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = h // nh
    shapes: dict[str, tuple[int, ...]] = {"model.norm.weight": (h,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if layout == "internlm2":
            shapes |= {
                p + "attention.wqkv.weight": ((nh + 2 * nkv) * hd, h),
                p + "attention.wo.weight": (h, nh * hd),
                p + "feed_forward.w1.weight": (inter, h),
                p + "feed_forward.w3.weight": (inter, h),
                p + "feed_forward.w2.weight": (h, inter),
                p + "attention_norm.weight": (h,),
                p + "ffn_norm.weight": (h,),
            }
            continue
        a, m = p + "self_attn.", p + "mlp."
        shapes |= {a + "q_proj.weight": (nh * hd, h), a + "k_proj.weight": (nkv * hd, h)}
        shapes |= {a + "v_proj.weight": (nkv * hd, h), a + "o_proj.weight": (h, nh * hd)}
        shapes |= {m + "gate_proj.weight": (inter, h), m + "up_proj.weight": (inter, h)}
        shapes |= {m + "down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,)}
        shapes |= {p + "post_attention_layernorm.weight": (h,)}
        if cfg["model_type"] == "qwen2":
            shapes |= {a + "q_proj.bias": (nh * hd,), a + "k_proj.bias": (nkv * hd,)}
            shapes |= {a + "v_proj.bias": (nkv * hd,)}
    sd = {k: torch.randn(s, generator=gen) * 0.2 for k, s in shapes.items()}
    for k, t in sd.items():
        if "norm" in k:
            t.add_(1.0)
    emb = "model.tok_embeddings.weight" if layout == "internlm2" else "model.embed_tokens.weight"
    sd[emb] = torch.randn(v, h, generator=gen)
    return sd


def _random_head(kind: str, h: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    if kind == "qwen2_reward":
        return {
            "score.0.weight": torch.randn(h, h, generator=gen) * h**-0.5,
            "score.0.bias": torch.randn(h, generator=gen) * 0.1,
            "score.2.weight": torch.randn(1, h, generator=gen) * h**-0.5,
            "score.2.bias": torch.randn(1, generator=gen),
        }
    name = "v_head.weight" if kind == "internlm2_reward" else "score.weight"
    return {name: torch.randn(1, h, generator=gen) * h**-0.5}


def make_tiny_reward_checkpoint(
    tmp_path: Path, kind: str = "internlm2_reward", seed: int = 0
) -> Path:
    """A tiny random-weight reward checkpoint folder (config, safetensors, tokenizer) of `kind`.

    kind: one of REWARD_KINDS. vocab_size covers the tokenizer (rounded up to a multiple of 64).
    """
    arch, layout = REWARD_KINDS[kind]
    folder = Path(tmp_path) / f"tiny-{kind}"
    folder.mkdir(parents=True, exist_ok=True)
    n_tok, eos, pad = _write_tokenizer(folder)
    model_type = {"hf": arch.split("For")[0].lower(), "internlm2": "internlm2"}[layout]
    cfg: dict = dict(TINY, architectures=[arch], model_type=model_type)
    cfg |= {
        "vocab_size": max(320, -(-n_tok // 64) * 64),
        "max_position_embeddings": 2048,
        "rope_theta": 1000000.0 if model_type in ("qwen2", "internlm2") else 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": eos,
        "pad_token_id": pad if pad is not None else eos,
    }
    if layout == "internlm2":
        cfg["bias"] = False
    gen = torch.Generator().manual_seed(seed)
    sd = _random_body(cfg, layout, gen) | _random_head(kind, cfg["hidden_size"], gen)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    return folder


def _batch(model: CausalLM, seqs: list[list[int]]) -> tuple[ForwardBatch, KVPool]:
    """All sequences prefilled together in one batch over fresh slots."""
    pool = KVPool(model.config, sum(len(s) for s in seqs) + 8, model.dtype)
    chunks, start = [], 0
    for s in seqs:
        chunks.append(SeqChunk(s, 0, list(range(start, start + len(s)))))
        start += len(s)
    return make_forward_batch(chunks, pool.pad_slot), pool


def tiny_reward_score(folder: Path, ids: list[int]) -> float:
    """The score our runtime gives `ids` on a checkpoint folder (label 0), for comparing servers."""
    model = load_model(folder)
    batch, pool = _batch(model, [ids])
    return float(model.score(batch, pool)[0, 0])


# ---- independent numpy reference (float64) ---------------------------------------------------
def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def numpy_last_hidden(
    sd: dict[str, np.ndarray], cfg: dict, ids: list[int], layout: str
) -> np.ndarray:
    """Final-normed hidden state `[H]` of the last token, straight from the checkpoint's tensors."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    h, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, g, eps, t = h // nh, nh // nkv, cfg["rms_norm_eps"], len(ids)
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    inv = 1.0 / (theta ** (np.arange(0, hd, 2) / hd))
    ang = np.arange(t)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(v: np.ndarray) -> np.ndarray:  # [t, heads, hd]
        rot = np.concatenate([-v[..., hd // 2 :], v[..., : hd // 2]], -1)
        return v * cos[:, None] + rot * sin[:, None]

    il = layout == "internlm2"
    x = sd["model.tok_embeddings.weight" if il else "model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = _rms(x, sd[p + ("attention_norm" if il else "input_layernorm") + ".weight"], eps)
        if il:
            qkv = (a @ sd[p + "attention.wqkv.weight"].T).reshape(t, nkv, g + 2, hd)
            q, k, v = qkv[:, :, :g].reshape(t, nh, hd), qkv[:, :, g], qkv[:, :, g + 1]
        else:
            q, k, v = (
                a @ sd[f"{p}self_attn.{n}_proj.weight"].T
                + sd.get(f"{p}self_attn.{n}_proj.bias", 0.0)
                for n in "qkv"
            )
            q, k, v = q.reshape(t, nh, hd), k.reshape(t, nkv, hd), v.reshape(t, nkv, hd)
        q, k = rope(q), rope(k)
        out = np.zeros((t, nh, hd))
        for head in range(nh):
            s = q[:, head] @ k[:, head // g].T / np.sqrt(hd) + np.triu(np.full((t, t), -np.inf), 1)
            s = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (s / s.sum(-1, keepdims=True)) @ v[:, head // g]
        x = (
            x
            + out.reshape(t, h)
            @ sd[p + ("attention.wo" if il else "self_attn.o_proj") + ".weight"].T
        )
        f = _rms(x, sd[p + ("ffn_norm" if il else "post_attention_layernorm") + ".weight"], eps)
        names = ("w1", "w3", "w2") if il else ("gate_proj", "up_proj", "down_proj")
        pre = p + ("feed_forward." if il else "mlp.")
        gate, up = f @ sd[pre + names[0] + ".weight"].T, f @ sd[pre + names[1] + ".weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ sd[pre + names[2] + ".weight"].T
    return _rms(x, sd["model.norm.weight"], eps)[-1]


def numpy_head(sd: dict[str, np.ndarray], hn: np.ndarray) -> float:
    """The score head on a final-normed row, by the checkpoint's own tensor names."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    if "score.0.weight" in sd:
        z = np.maximum(sd["score.0.weight"] @ hn + sd["score.0.bias"], 0.0)
        return float(sd["score.2.weight"][0] @ z + sd["score.2.bias"][0])
    return float((sd["v_head.weight"] if "v_head.weight" in sd else sd["score.weight"])[0] @ hn)


# ---- end to end -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "labels"), [("Llama", 1), ("Llama", 3), ("Mistral", 1), ("Qwen2", 1)]
)
def test_seq_cls_matches_transformers(tmp_path: Path, arch: str, labels: int) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    extra = {"sliding_window": None} if arch == "Mistral" else {}
    cfg = getattr(transformers, f"{arch}Config")(
        **TINY,
        vocab_size=320,
        max_position_embeddings=256,
        num_labels=labels,
        pad_token_id=0,
        **extra,
    )
    ref = getattr(transformers, f"{arch}ForSequenceClassification")(cfg).eval()
    with torch.no_grad():  # non-trivial norms and a head big enough to matter
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(torch.rand_like(p) * 0.5)
        ref.score.weight.normal_(0, 0.3)
    ref.save_pretrained(tmp_path / "ckpt")
    model = load_model(tmp_path / "ckpt")
    batch, pool = _batch(model, SEQS)
    got = model.score(batch, pool)  # [B, labels]
    assert got.shape == (2, labels)
    kernel_path = reward.score_batch(model, batch, pool)  # [B] label 0
    for i, s in enumerate(SEQS):  # one at a time: no padding in the HF call
        with torch.no_grad():
            want = ref(torch.tensor([s])).logits[0].float()  # [labels]
        assert (got[i] - want).abs().max().item() <= 1e-4
        assert abs(kernel_path[i].item() - want[0].item()) <= 1e-4


def test_internlm2_reward_matches_numpy(tmp_path: Path) -> None:
    folder = make_tiny_reward_checkpoint(tmp_path, "internlm2_reward")
    sd, cfg = (
        load_file(folder / "model.safetensors"),
        json.loads((folder / "config.json").read_text()),
    )
    model = load_model(folder)
    seqs = [[5, 17, 88, 3, 250, 9, 41], [100, 7, 7, 200]]
    batch, pool = _batch(model, seqs)
    got, kernel_path = model.score(batch, pool)[:, 0], reward.score_batch(model, batch, pool)
    for i, s in enumerate(seqs):
        want = numpy_head(sd, numpy_last_hidden(sd, cfg, s, "internlm2"))
        assert abs(got[i].item() - want) <= 1e-4
        assert abs(kernel_path[i].item() - want) <= 1e-4


def test_qwen2_reward_matches_numpy(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    hf_cfg = transformers.Qwen2Config(**TINY, vocab_size=320, max_position_embeddings=256)
    body = transformers.Qwen2Model(hf_cfg).eval()
    sd = {f"model.{k}": v.detach().clone() for k, v in body.state_dict().items()}
    for k, v in sd.items():
        if "norm" in k:
            v.add_(torch.rand_like(v) * 0.5)
    sd |= _random_head("qwen2_reward", 64, torch.Generator().manual_seed(2))
    cfg = hf_cfg.to_dict() | {"architectures": ["Qwen2ForRewardModel"]}
    folder = tmp_path / "qwen2_rm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(folder / "model.safetensors"))
    model = load_model(folder)
    batch, pool = _batch(model, SEQS)
    got, kernel_path = model.score(batch, pool)[:, 0], reward.score_batch(model, batch, pool)
    np_sd = {k: v.numpy() for k, v in sd.items()}
    for i, s in enumerate(SEQS):
        want = numpy_head(np_sd, numpy_last_hidden(np_sd, cfg, s, "hf"))
        assert abs(got[i].item() - want) <= 1e-4
        assert abs(kernel_path[i].item() - want) <= 1e-4


@pytest.mark.parametrize("kind", sorted(REWARD_KINDS))
def test_twin_matches_model_head(tmp_path: Path, kind: str) -> None:
    folder = make_tiny_reward_checkpoint(tmp_path, kind)
    seqs = [[3, 1, 4, 1, 5, 9, 2, 6], [27, 18], [8]]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        model = load_model(folder, dtype=dtype)
        batch, pool = _batch(model, seqs)
        want = model.score_from_hidden(model.hidden(batch, pool))[:, 0]  # [B]
        rows = model.hidden_rows(batch, pool)  # [T, H]
        head = reward.head_tensors(model)
        got = reward_head.reward_scores_torch(
            rows,
            batch.logits_index,
            model.norm,
            model.config.rms_norm_eps,
            head,
            model.config.head_kind,
        )
        assert got.dtype == torch.float32 and got.shape == (3,)
        assert ((got - want).abs() <= tol * (1 + want.abs())).all(), (kind, dtype, got, want)
        assert torch.equal(reward.score_batch(model, batch, pool), got)  # CPU: the twin


# ---- the twin on random data -------------------------------------------------------------------
def _np64(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy().astype(np.float64)


def _round(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    return _np64(torch.from_numpy(x).to(dtype))


def numpy_scores(
    rows: torch.Tensor,
    idx: torch.Tensor,
    nw: torch.Tensor,
    eps: float,
    head: dict[str, torch.Tensor],
    kind: str,
    emulate: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """float64 reference `[B]` and each row's term scale sqrt(sum(terms^2)) `[B]`.

    `emulate`: round the normed rows and W1's output to this dtype, as the twin's matmul does.
    """
    x = _np64(rows)[idx.numpy()]  # [B, H]
    xn = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * _np64(nw)
    if kind in reward_head.DOT_KINDS:
        terms = xn * _np64(head["weight"])[None]
        return terms.sum(-1), np.sqrt((terms**2).sum(-1))
    if emulate is not None:
        xn = _round(xn, emulate)
    z = xn @ _np64(head["w1"]).T
    if emulate is not None:
        z = _round(z, emulate)
    terms = np.maximum(z + _np64(head["b1"]), 0.0) * _np64(head["w2"])[None]
    return terms.sum(-1) + _np64(head["b2"])[0], np.sqrt((terms**2).sum(-1))


@pytest.mark.parametrize("kind", ["internlm2_reward", "qwen2_reward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_twin_matches_numpy(kind: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    t, h = 50, 96
    rows = (torch.randn(t, h, generator=g) * 3).to(dtype)  # [T, H]
    idx = torch.tensor([49, 3, 17, 17, 0])  # [B], any order, repeats allowed
    nw = (1 + 0.3 * torch.randn(h, generator=g)).to(dtype)
    if kind in reward_head.DOT_KINDS:
        head = {"weight": (torch.randn(h, generator=g) / h**0.5).to(dtype)}
    else:
        head = {
            "w1": (torch.randn(h, h, generator=g) / h**0.5).to(dtype),
            "b1": (0.1 * torch.randn(h, generator=g)).to(dtype),
            "w2": (torch.randn(1, h, generator=g) / h**0.5).to(dtype),  # [1, H] accepted
            "b2": torch.randn(1, generator=g).to(dtype),
        }
    got = reward_head.reward_scores_torch(rows, idx, nw, 1e-6, head, kind).numpy()
    want, scale = numpy_scores(rows, idx, nw, 1e-6, head, kind)
    loose = kind == "qwen2_reward" and dtype != torch.float32  # bf16 rounding inside the MLP
    assert (np.abs(got - want) <= (2e-2 if loose else 1e-5) * scale + 1e-6).all()
    if loose:  # with the same roundings emulated, the twin agrees tightly
        want, scale = numpy_scores(rows, idx, nw, 1e-6, head, kind, emulate=dtype)
        assert (np.abs(got - want) <= 1e-4 * scale + 1e-6).all()
    assert np.array_equal(reward_head.reward_scores(rows, idx, nw, 1e-6, head, kind).numpy(), got)


def test_bad_inputs_raise() -> None:
    rows, nw = torch.randn(4, 8), torch.ones(8)
    idx, head = torch.tensor([3]), {"weight": torch.ones(8)}
    with pytest.raises(ValueError, match="unknown reward head kind"):
        reward_head.reward_scores_torch(rows, idx, nw, 1e-6, head, "lm")
    with pytest.raises(ValueError, match="int64"):
        reward_head.reward_scores_torch(rows, idx.int(), nw, 1e-6, head, "seq_cls")
    with pytest.raises(ValueError, match="weight must have shape"):
        reward_head.reward_scores_torch(rows, idx, nw, 1e-6, {"weight": torch.ones(7)}, "seq_cls")
    with pytest.raises(ValueError, match="w1 must have shape"):
        reward_head.reward_scores_torch(rows, idx, nw, 1e-6, head, "qwen2_reward")
    assert reward_head.reward_scores(rows, idx[:0], nw, 1e-6, head, "seq_cls").shape == (0,)
    if reward_head.cupy_available():
        with pytest.raises(ValueError, match="CUDA"):
            reward_head.reward_scores_cupy(rows, idx, nw, 1e-6, head, "seq_cls")


@pytest.mark.parametrize("kind", sorted(REWARD_KINDS))
def test_tiny_checkpoint_serves(tmp_path: Path, kind: str) -> None:
    from runtime.text.tokenizer import Tokenizer

    folder = make_tiny_reward_checkpoint(tmp_path, kind)
    tok = Tokenizer.from_dir(folder)
    model = load_model(folder)
    assert model.config.head_kind != "lm" and model.config.vocab_size >= tok.vocab_size
    ids = tok.encode("<|im_start|>user\nhello<|im_end|>\n<|reward|>")
    assert ids and max(ids) < model.config.vocab_size
    if tok.token_to_id("<|reward|>") is not None:
        assert ids[-1] == tok.token_to_id("<|reward|>")
    assert np.isfinite(tiny_reward_score(folder, ids))
