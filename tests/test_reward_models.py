"""Reward models end to end on tiny checkpoints (tests/server_helpers.py builds them):
transformers / numpy parity, and the reward-head twin."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from cuda import reward_head
from runtime.loading.hf_folder import load_model
from runtime.model import reward
from tests.server_helpers import (
    REWARD_KINDS,
    TINY,
    make_tiny_reward_checkpoint,
    random_reward_head,
    reward_batch,
    tiny_reward_score,
)

SEQS = [[5, 17, 88, 3, 250, 9, 41, 77, 13, 2, 61], [100, 7, 7, 300, 19]]


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
    batch, pool = reward_batch(model, SEQS)
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
    batch, pool = reward_batch(model, seqs)
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
    sd |= random_reward_head("qwen2_reward", 64, torch.Generator().manual_seed(2))
    cfg = hf_cfg.to_dict() | {"architectures": ["Qwen2ForRewardModel"]}
    folder = tmp_path / "qwen2_rm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(folder / "model.safetensors"))
    model = load_model(folder)
    batch, pool = reward_batch(model, SEQS)
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
        batch, pool = reward_batch(model, seqs)
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
    # the tiny tokenizer (the default model's) has no <|reward|> token: it is plain text here
    assert tok.token_to_id("<|reward|>") is None
    assert tok.decode(ids).endswith("<|reward|>")
    assert np.isfinite(tiny_reward_score(folder, ids))
