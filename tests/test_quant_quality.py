"""The quality bar of the quantized CPU modes on the default model (its own Q4_1/Q8_0 blocks):
teacher-forced over 1,024 tokens of a fixed text against the fp32 dequantized model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from runtime.engine.args import EngineArgs
from runtime.engine.loader import load_model_for
from runtime.kernels.cpu.quant_linear import QuantLinear
from runtime.model.llama import CausalLM
from runtime.model.memory import weight_bytes
from runtime.text.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "profiling"))
import bench_quality as bq  # noqa: E402

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ids(default_model_dir: Path) -> list[int]:
    return bq.text_ids(Tokenizer.from_dir(default_model_dir), 1024)


@pytest.fixture(scope="module")
def reference(default_model_dir: Path) -> CausalLM:
    return load_model_for(EngineArgs(quant_type="none", data_type="fp32"), default_model_dir, CPU)


def _quant(folder: Path, mode: str) -> CausalLM:
    model = load_model_for(EngineArgs(quant_type="auto", quant_mode=mode), folder, CPU)
    assert isinstance(model.decoder_layers()[0].qkv_proj, QuantLinear)
    return model


def test_exact_mode_is_the_dequantized_model(
    default_model_dir: Path, reference: CausalLM, ids: list[int]
) -> None:
    model = _quant(default_model_dir, "exact")
    gguf_bytes = (default_model_dir / "model.gguf").stat().st_size
    assert weight_bytes(model) <= 1.2 * gguf_bytes  # the file's blocks, not fp32 copies
    a = bq.compare(reference, model, ids)
    assert a.max_abs_diff <= 2e-3, a.max_abs_diff  # fp32 rounding (logits of magnitude ~30)
    assert a.top1 >= 0.999 and a.mean_kl <= 1e-6, (a.top1, a.mean_kl)


def test_int16_mode_meets_the_bar(
    default_model_dir: Path, reference: CausalLM, ids: list[int]
) -> None:
    """int16 activations (the CPU default) meet the fast-mode bar (top-1 >= 99 %, KL <= 1e-3)
    with the GGUF's blocks as shipped: weights within 1.2x the file."""
    model = _quant(default_model_dir, "int16")
    gguf_bytes = (default_model_dir / "model.gguf").stat().st_size
    assert weight_bytes(model) <= 1.2 * gguf_bytes
    a = bq.compare(reference, model, ids)
    assert a.top1 >= 0.99 and a.mean_kl <= 1e-3, (a.top1, a.mean_kl)
    assert abs(a.perplexity(a.nll) / a.perplexity(a.nll_ref) - 1) < 0.001


def test_fast_mode_stays_where_the_readme_puts_it(
    default_model_dir: Path, reference: CausalLM, ids: list[int]
) -> None:
    """Fast mode misses the bar (top-1 >= 99 %, KL <= 1e-3) on this model, which is why it is
    opt-in and never a default; the README's figures (top-1 97.0 %, KL 3.8e-3) must hold."""
    a = bq.compare(reference, _quant(default_model_dir, "fast"), ids)
    assert 0.96 <= a.top1 < 0.99, a.top1
    assert 1e-3 < a.mean_kl <= 5e-3, a.mean_kl
    assert abs(a.perplexity(a.nll) / a.perplexity(a.nll_ref) - 1) < 0.01


def test_fp16_weights_meet_the_bar(
    default_model_dir: Path, reference: CausalLM, ids: list[int]
) -> None:
    """The CPU default (fp16-stored weights, fp32 arithmetic) meets the fast-mode bar."""
    model = load_model_for(EngineArgs(quant_type="none", data_type="fp16"), default_model_dir, CPU)
    a = bq.compare(reference, model, ids)
    assert a.top1 >= 0.99 and a.mean_kl <= 1e-3, (a.top1, a.mean_kl)
