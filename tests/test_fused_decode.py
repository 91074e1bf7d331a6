"""int16 mode's fused decode step against the per-op path: the same bits, K/V included.

The default model (q4_1) and a tiny random Qwen2-style model (q/k/v bias) quantized at load to
q4_0 and q8_0, at batch sizes covering every GEMV tile and both attention drivers; batches the
fused step does not take (prefill, mixed, past the integer GEMV's rows) keep the per-op path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runtime.engine.args import EngineArgs
from runtime.engine.loader import load_runner
from runtime.kernels.cpu import numba_cache
from runtime.kernels.cpu.fused_decode import FusedDecode
from runtime.loading.gguf_weights import quantize_dense
from runtime.model.batch import SeqChunk, make_forward_batch
from runtime.model.config import ModelConfig
from runtime.model.kv_pool import KVPool
from runtime.model.llama import CausalLM

SPAN = 256  # slots per sequence

QWEN = {
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


def _both_paths(
    model: CausalLM, pool: KVPool, prompt_lens: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill prompts of `prompt_lens`, then one decode step per path from the same K/V:
    (largest |fused - per-op| of the hidden rows, of the K/V pools)."""
    fused = model.fused_decode
    assert fused is not None
    slots = [list(range(i * SPAN, (i + 1) * SPAN)) for i in range(len(prompt_lens))]
    prompts = [[(7 * i + j) % 200 + 3 for j in range(n)] for i, n in enumerate(prompt_lens)]
    chunks = [SeqChunk(p, 0, s) for p, s in zip(prompts, slots, strict=True)]
    model.hidden(make_forward_batch(chunks, pool.pad_slot, "cpu"), pool)
    step = [
        SeqChunk([i + 5], len(p), s) for i, (p, s) in enumerate(zip(prompts, slots, strict=True))
    ]
    batch = make_forward_batch(step, pool.pad_slot, "cpu")
    assert FusedDecode.applies(batch.query_lens)
    k0, v0 = pool.k.clone(), pool.v.clone()
    model.fused_decode = None
    ref = model.hidden_rows(batch, pool)  # [T, H]
    k_ref, v_ref = pool.k.clone(), pool.v.clone()
    pool.k.copy_(k0)
    pool.v.copy_(v0)
    model.fused_decode = fused
    out = model.hidden_rows(batch, pool)
    kv_diff = torch.maximum((pool.k - k_ref).abs().max(), (pool.v - v_ref).abs().max())
    assert not torch.equal(pool.k, k0), "the step stored no K"
    return (out - ref).abs().max(), kv_diff


@pytest.fixture(scope="module")
def default_runner(default_model_dir: Path):  # type: ignore[no-untyped-def]
    runner, _ = load_runner(EngineArgs(max_total_token_num=64 * SPAN))
    return runner


@pytest.mark.parametrize("lens", [[17], [30, 9], [5, 40, 12, 7, 22], [120] * 9, [3] * 64])
def test_default_model_fused_equals_per_op(default_runner, lens: list[int]) -> None:  # type: ignore[no-untyped-def]
    """Tiles 1-8 with remainders, serial and parallel attention (9 x 121 slot rows), 64 rows."""
    model = default_runner.model
    assert model.fused_decode is not None, "the default model's decode steps are fused"
    hidden_diff, kv_diff = _both_paths(model, default_runner.pool, lens)
    assert hidden_diff == 0.0 and kv_diff == 0.0


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_qkv_bias_and_formats_fused_equals_per_op(fmt: str) -> None:
    torch.manual_seed(0)
    dense = CausalLM(ModelConfig.from_hf_dict(QWEN))
    with torch.no_grad():
        for name, p in dense.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.08)
    model = quantize_dense(dense, fmt, "int16")
    from runtime.model.backends import BackendSettings, select_backends

    model.use_backends(select_backends(torch.device("cpu"), torch.float32, BackendSettings()))
    assert model.config.qkv_bias and model.fuse_decode()
    pool = KVPool(model.config, 8 * SPAN, torch.float32)
    for lens in ([11], [4, 25, 9], [60] * 8):
        hidden_diff, kv_diff = _both_paths(model, pool, lens)
        assert hidden_diff == 0.0 and kv_diff == 0.0


def test_batches_the_fused_step_does_not_take() -> None:
    assert FusedDecode.applies([1] * 64)
    assert not FusedDecode.applies([1] * 65)  # past the integer GEMV's rows
    assert not FusedDecode.applies([1, 1, 4])  # a prefill chunk in the batch
    assert not FusedDecode.applies([])


def test_layers_setting_and_torch_kernels_keep_the_per_op_path(default_model_dir: Path) -> None:
    for overrides in ({"cpu_decode": "layers"}, {"cpu_kernels": "torch"}, {"quant_mode": "exact"}):
        runner, _ = load_runner(EngineArgs(max_total_token_num=256, **overrides))  # type: ignore[arg-type]
        assert runner.model.fused_decode is None, overrides


def test_kernel_cache_dropped_when_any_module_changes(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    (cache / "a.f-1.py311.nbi").write_bytes(b"index")
    assert numba_cache.refresh_folder(tmp_path)  # no stamp yet: dropped
    assert not list(cache.glob("*.nbi"))
    (cache / "a.f-1.py311.nbi").write_bytes(b"index")
    assert not numba_cache.refresh_folder(tmp_path)  # unchanged sources: kept
    assert list(cache.glob("*.nbi"))
    (tmp_path / "b.py").write_text("y = 2\n")  # another module of the folder changed
    assert numba_cache.refresh_folder(tmp_path)
    assert not list(cache.glob("*.nbi"))
