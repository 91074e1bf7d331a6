"""The embedded default model against transformers loaded from our converted cache folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runtime.loading.hf_folder import load_model
from runtime.model.assemble import assemble
from runtime.model.batch import SeqChunk, make_forward_batch
from runtime.model.kv_pool import KVPool
from runtime.model.llama import CausalLM
from runtime.text.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ours(default_model_dir: Path) -> CausalLM:
    model = load_model(default_model_dir)
    assemble(model)  # as the engine runs it on the CPU: Numba kernels, packed projections
    return model


@pytest.fixture(scope="module")
def reference(default_model_dir: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        default_model_dir, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def chat_ids(default_model_dir: Path) -> list[int]:
    tok = Tokenizer.from_dir(default_model_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Explain in two sentences why the sky is blue."}],
        add_generation_prompt=True,
    )
    return tok.encode(text)


def test_prefill_logits_match_transformers(
    ours: CausalLM, reference: torch.nn.Module, chat_ids: list[int]
) -> None:
    pool = KVPool(ours.config, 256, torch.float32)
    batch = make_forward_batch(
        [SeqChunk(chat_ids, 0, list(range(len(chat_ids))))], pool.pad_slot, all_logits=True
    )
    got = ours(batch, pool)  # [T, V]
    with torch.no_grad():
        want = reference(torch.tensor([chat_ids])).logits[0].float()  # [T, V]
    assert (got - want).abs().max().item() <= 1e-3
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_greedy_continuation_matches_generate(
    ours: CausalLM, reference: torch.nn.Module, chat_ids: list[int]
) -> None:
    n_new = 32
    pool = KVPool(ours.config, 256, torch.float32)
    slots = list(range(7, 7 + len(chat_ids) + n_new))  # any slots: not starting at 0
    logits = ours(make_forward_batch([SeqChunk(chat_ids, 0, slots)], pool.pad_slot), pool)
    tokens = [int(logits.argmax(-1))]
    while len(tokens) < n_new:  # one-token decode steps through the KV pool
        pos = len(chat_ids) + len(tokens) - 1
        step = make_forward_batch([SeqChunk([tokens[-1]], pos, slots)], pool.pad_slot)
        tokens.append(int(ours(step, pool).argmax(-1)))
    with torch.no_grad():
        ref = reference.generate(
            torch.tensor([chat_ids]),
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            attention_mask=torch.ones(1, len(chat_ids), dtype=torch.long),
        )[0, len(chat_ids) :].tolist()
    assert tokens == ref
