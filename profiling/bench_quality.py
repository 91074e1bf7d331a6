"""Quality bar of the CPU weight modes: teacher-forced over a fixed text against the fp32 model.

For each mode (quantized exact / fast, fp16 weights) against the fp32 dequantized default model:
the largest logit difference, top-1 agreement, mean KL(fp32 || mode) in nats, and each model's
perplexity on the text (`profiling/data/quality_text.txt`, the Apache License 2.0). The test
`tests/test_quant_quality.py` asserts the bar; this script prints it:

    python profiling/bench_quality.py [--tokens 1200]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime.model.batch import SeqChunk, make_forward_batch  # noqa: E402
from runtime.model.kv_pool import KVPool  # noqa: E402
from runtime.model.llama import CausalLM  # noqa: E402

TEXT_PATH = ROOT / "profiling" / "data" / "quality_text.txt"


def text_ids(tokenizer: object, n_tokens: int) -> list[int]:
    """The first `n_tokens` tokens of the fixed text."""
    ids: list[int] = tokenizer.encode(TEXT_PATH.read_text())  # type: ignore[attr-defined]
    if len(ids) < n_tokens:
        raise ValueError(f"{TEXT_PATH} has only {len(ids)} tokens")
    return ids[:n_tokens]


def chunk_logits(model: CausalLM, ids: list[int], chunk: int = 256) -> Iterator[torch.Tensor]:
    """Teacher-forced logits `[c, V]` of consecutive chunks of `ids` (prefill through the pool)."""
    pool = KVPool(model.config, len(ids), torch.float32)
    slots = list(range(len(ids)))
    for start in range(0, len(ids), chunk):
        new = ids[start : start + chunk]
        batch = make_forward_batch(
            [SeqChunk(new, start, slots[: start + len(new)])], pool.pad_slot, all_logits=True
        )
        yield model(batch, pool)  # [c, V] fp32


@dataclass
class Agreement:
    """Running figures of a model against the reference, position by position."""

    positions: int = 0
    top1_same: int = 0
    kl_sum: float = 0.0
    max_abs_diff: float = 0.0
    nll_ref: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)

    def add(self, ref: torch.Tensor, got: torch.Tensor, targets: torch.Tensor) -> None:
        """ref/got `[c, V]` logits of the same positions; targets `[c]` the next tokens (-1: none)."""
        lp_ref = torch.log_softmax(ref.double(), -1)  # [c, V]
        lp = torch.log_softmax(got.double(), -1)
        self.positions += ref.shape[0]
        self.top1_same += int((ref.argmax(-1) == got.argmax(-1)).sum())
        self.kl_sum += float((lp_ref.exp() * (lp_ref - lp)).sum())
        self.max_abs_diff = max(self.max_abs_diff, float((ref - got).abs().max()))
        keep = targets >= 0
        idx = targets[keep][:, None]
        self.nll_ref += (-lp_ref[keep].gather(1, idx)[:, 0]).tolist()
        self.nll += (-lp[keep].gather(1, idx)[:, 0]).tolist()

    @property
    def top1(self) -> float:
        return self.top1_same / self.positions

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / self.positions

    @staticmethod
    def perplexity(nll: list[float]) -> float:
        return float(torch.tensor(nll).mean().exp())


def compare(ref: CausalLM, model: CausalLM, ids: list[int], chunk: int = 8) -> Agreement:
    """Teacher-forced agreement of `model` with `ref` over `ids`, `chunk` tokens a forward: few
    enough that quantized layers take their decode (GEMV) kernels, where the modes differ."""
    out = Agreement()
    nxt = torch.tensor([*ids[1:], -1])  # [N] the token each position predicts
    chunks = zip(chunk_logits(ref, ids, chunk), chunk_logits(model, ids, chunk), strict=True)
    for i, (a, b) in enumerate(chunks):
        out.add(a, b, nxt[i * chunk : i * chunk + a.shape[0]])
    return out


def _models(folder: Path) -> Iterator[tuple[str, CausalLM]]:
    from runtime.engine.args import EngineArgs
    from runtime.engine.loader import load_model_for

    cpu = torch.device("cpu")
    for name, kw in (
        ("quant exact", {"quant_type": "auto", "quant_mode": "exact"}),
        ("quant int16", {"quant_type": "auto", "quant_mode": "int16"}),
        ("quant fast", {"quant_type": "auto", "quant_mode": "fast"}),
        ("fp16 weights", {"quant_type": "none", "data_type": "fp16"}),
    ):
        yield name, load_model_for(EngineArgs(**kw), folder, cpu)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1200, help="teacher-forced positions")
    args = parser.parse_args()
    from runtime.engine.args import EngineArgs
    from runtime.engine.loader import load_model_for
    from runtime.loading.default_model import default_model_dir
    from runtime.text.tokenizer import Tokenizer

    folder = default_model_dir()
    ids = text_ids(Tokenizer.from_dir(folder), args.tokens)
    ref = load_model_for(
        EngineArgs(quant_type="none", data_type="fp32"), folder, torch.device("cpu")
    )
    print(f"{len(ids)} tokens of {TEXT_PATH.name}, against the fp32 dequantized model")
    print("| mode | max abs logit diff | top-1 agreement | mean KL (nats) | ppl (fp32 ref) | ppl |")
    print("|---|---|---|---|---|---|")
    for name, model in _models(folder):
        a = compare(ref, model, ids)
        print(
            f"| {name} | {a.max_abs_diff:.2e} | {a.top1:.4f} | {a.mean_kl:.2e} | "
            f"{a.perplexity(a.nll_ref):.3f} | {a.perplexity(a.nll):.3f} |"
        )


if __name__ == "__main__":
    main()
