"""Sampler vs an independent, loop-per-row numpy reference of the spec §4 pipeline."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from cuda import penalties
from runtime.sampling.params import SamplingParams
from runtime.sampling.sampler import (
    PenaltyCounts,
    RowState,
    Sampler,
    build_sampling_batch,
    derive_seed,
    row_uniforms,
    sample_inverse_cdf,
    topk_topp_mask,
)

V = 1000
EOS = [2, 7]


@dataclass
class Case:
    params: SamplingParams
    prompt: list[int]
    generated: list[int]
    seed: int

    def state(self) -> RowState:
        row = RowState.start(self.params, self.prompt)
        row.seed = self.seed
        for tok in self.generated:
            row.record(tok)
        return row


def random_case(rng: np.random.Generator, vocab: int = V) -> Case:
    """A row with random parameters and a random token history (repeats included)."""
    greedy = rng.random() < 0.25
    pen = rng.random() < 0.7
    params = SamplingParams(
        do_sample=not greedy,
        temperature=float(rng.choice([1e-6, 0.3, 0.7, 1.0, 1.6])),
        top_p=float(rng.choice([1.0, 1.0, 0.95, 0.6, 0.05])),
        top_k=int(rng.choice([-1, -1, 1, 5, 50, 2 * vocab])),
        repetition_penalty=float(rng.uniform(0.5, 2.0)) if pen else 1.0,
        frequency_penalty=float(rng.uniform(-1, 1)) if pen else 0.0,
        presence_penalty=float(rng.uniform(-1, 1)) if pen else 0.0,
        input_penalty=bool(rng.random() < 0.5),
        min_new_tokens=int(rng.integers(1, 12)),
        exponential_decay_length_penalty=(int(rng.integers(0, 10)), float(rng.uniform(1, 1.3))),
    )
    hot = rng.integers(0, vocab, size=20)  # a small pool so tokens repeat
    prompt = [int(t) for t in rng.choice(hot, size=int(rng.integers(0, 15)))]
    generated = [int(t) for t in rng.choice(hot, size=int(rng.integers(0, 25)))]
    if rng.random() < 0.5:
        generated.append(EOS[0])
    return Case(params, prompt, generated, int(rng.integers(0, 2**63 - 1)))


def ref_shaped(logits: np.ndarray, case: Case, eos: list[int]) -> np.ndarray:
    """Spec §4 steps 1-2 for one row, in float64."""
    p = case.params
    x = logits.astype(np.float64).copy()
    hist = Counter(case.generated)
    if p.input_penalty:
        hist += Counter(case.prompt)
    for tok, c in hist.items():
        v = x[tok]
        v = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        x[tok] = v - c * p.frequency_penalty - p.presence_penalty
    g = len(case.generated)
    start, factor = p.exponential_decay_length_penalty
    for e in eos:
        x[e] += abs(x[e]) * (factor ** max(g - start, 0) - 1)
        if g < p.min_new_tokens - 1:
            x[e] = -1e7
    return x


def ref_keep(probs: np.ndarray, top_k: int, top_p: float, slack: float = 0.0) -> np.ndarray:
    """Top-k/top-p keep mask of one row (vocab order); `slack` widens top_p."""
    order = np.argsort(-probs, kind="stable")
    sorted_p = probs[order].astype(np.float64)
    exclusive = np.cumsum(sorted_p) - sorted_p
    k = len(probs) if top_k == -1 else top_k
    keep_sorted = (np.arange(len(probs)) < k) & ((exclusive <= top_p + slack) | (top_p >= 1.0))
    keep = np.zeros(len(probs), dtype=bool)
    keep[order] = keep_sorted
    return keep


def ref_row(logits: np.ndarray, case: Case, eos: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(shaped logits, log-probs after temperature) of one row."""
    x = ref_shaped(logits, case, eos)
    p = case.params
    t = 1.0 if (not p.do_sample or p.temperature < 1e-5) else p.temperature
    z = x / t
    m = z.max()
    return x, z - (m + math.log(np.exp(z - m).sum()))


def run_batch(cases: list[Case], logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = [c.state() for c in cases]
    batch = build_sampling_batch(rows, EOS, logits.shape[1], "cpu")
    tokens, logprobs = Sampler().sample(torch.from_numpy(logits), batch)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    return tokens.numpy(), logprobs.numpy()


def test_pipeline_matches_reference() -> None:
    rng = np.random.default_rng(1)
    for _ in range(3):
        cases = [random_case(rng) for _ in range(8)]
        logits = (rng.normal(size=(8, V)) * 3).astype(np.float32)
        original = logits.copy()
        batch = build_sampling_batch([c.state() for c in cases], EOS, V, "cpu")
        shaped = Sampler().shaped_logits(torch.from_numpy(logits), batch).numpy()
        tokens, logprobs = run_batch(cases, logits)
        np.testing.assert_array_equal(logits, original)  # input untouched
        for b, case in enumerate(cases):
            ref_x, ref_logp = ref_row(logits[b], case, EOS)
            np.testing.assert_allclose(shaped[b], ref_x, rtol=1e-6, atol=1e-5)
            tok = int(tokens[b])
            np.testing.assert_allclose(logprobs[b], ref_logp[tok], rtol=1e-6, atol=1e-5)
            if case.params.greedy:
                assert tok == int(np.argmax(ref_x))
            else:
                p = case.params
                allowed = ref_keep(np.exp(ref_logp), p.top_k, p.top_p, slack=1e-4)
                assert allowed[tok], (b, tok)


def test_penalty_twin_matches_numpy() -> None:
    rng = np.random.default_rng(2)
    b, v = 6, 300
    logits = rng.normal(size=(b, v)).astype(np.float32) * 4
    rows: list[dict[int, int]] = [
        {int(t): int(rng.integers(0, 4)) for t in rng.choice(v, size=int(rng.integers(0, 30)))}
        for _ in range(b)
    ]
    rep = rng.uniform(0.5, 2, b).astype(np.float32)
    freq = rng.uniform(-2, 2, b).astype(np.float32)
    pres = rng.uniform(-2, 2, b).astype(np.float32)
    eos = np.array([3, 11], np.int64)
    rows[0][3] = 2  # an EOS id that is also penalised
    gen = rng.integers(0, 20, b).astype(np.int64)
    min_new = rng.integers(1, 20, b).astype(np.int64)
    start = rng.integers(0, 10, b).astype(np.int64)
    factor = rng.uniform(1, 1.5, b).astype(np.float32)

    expected = logits.astype(np.float64)
    for r, hist in enumerate(rows):
        for tok, c in hist.items():
            x = expected[r, tok]
            if c > 0:
                x = x / rep[r] if x > 0 else x * rep[r]
                expected[r, tok] = x - c * freq[r] - pres[r]
        for e in eos:
            expected[r, e] += abs(expected[r, e]) * (factor[r] ** max(gen[r] - start[r], 0) - 1)
            if gen[r] < min_new[r] - 1:
                expected[r, e] = -1e7

    token_ids = [t for hist in rows for t in hist]
    counts = [c for hist in rows for c in hist.values()]
    row_ptr = np.cumsum([0] + [len(h) for h in rows])
    got = torch.from_numpy(logits.copy())
    penalties.apply_penalties_(
        got,
        torch.tensor(token_ids, dtype=torch.int64),
        torch.tensor(counts, dtype=torch.int32),
        torch.tensor(row_ptr, dtype=torch.int64),
        *(torch.from_numpy(a) for a in (rep, freq, pres, eos, gen, min_new, start, factor)),
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-5)


def test_topk_topp_mask_matches_reference() -> None:
    rng = np.random.default_rng(3)
    b, v = 12, 400
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(b, v)) * 2).float(), dim=-1)
    top_k = torch.tensor([v, 1, 5, 50, v, v, 3, v, 399, v, 100, 7])
    top_p = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5, 0.9, 0.3, 0.01, 1.0, 0.999, 0.8, 0.95])
    keep = topk_topp_mask(probs, top_k, top_p).numpy()
    for r in range(b):
        expected = ref_keep(probs[r].numpy(), int(top_k[r]), float(top_p[r]))
        np.testing.assert_array_equal(keep[r], expected, err_msg=f"row {r}")
    assert keep[0].all() and keep[1].sum() == 1 and keep[7].sum() >= 1


def test_topp_keeps_the_token_crossing_the_threshold() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2]] * 3)
    keep = topk_topp_mask(probs, torch.tensor([3, 3, 3]), torch.tensor([0.4, 0.5, 0.6]))
    assert keep.tolist() == [[True, False, False], [True, True, False], [True, True, False]]


def test_greedy_fast_path() -> None:
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(5, 64)).astype(np.float32)
    rows = [RowState(SamplingParams(), PenaltyCounts([1, 2]), 3, i) for i in range(5)]
    batch = build_sampling_batch(rows, [], 64, "cpu")
    assert batch.all_greedy and not batch.needs_penalties and not batch.needs_eos_shaping
    tokens, logprobs = Sampler().sample(torch.from_numpy(logits), batch)
    assert tokens.tolist() == logits.argmax(-1).tolist()
    expected = torch.log_softmax(torch.from_numpy(logits), -1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs, expected)


def test_seeded_draw_is_independent_of_the_batch() -> None:
    rng = np.random.default_rng(5)
    v = 200
    for trial in range(4):
        target = random_case(rng, v)
        target.params.do_sample, target.params.temperature = True, 1.0
        target.params.top_p = [1.0, 0.9, 1.0, 0.7][trial]
        target.params.top_k = [-1, -1, 20, 20][trial]
        row_logits = rng.normal(size=(1, v)).astype(np.float32)
        alone_tok, alone_lp = run_batch([target], row_logits)
        others = [random_case(rng, v) for _ in range(16)]
        other_logits = rng.normal(size=(16, v)).astype(np.float32)
        for pos in range(17):
            cases = others[:pos] + [target] + others[pos:]
            logits = np.concatenate([other_logits[:pos], row_logits, other_logits[pos:]])
            tok, lp = run_batch(cases, logits)
            assert tok[pos] == alone_tok[0] and lp[pos] == alone_lp[0], (trial, pos)


def test_draws_follow_the_distribution() -> None:
    """Chi-square over 4000 draws (one per step) of a 5-token distribution."""
    logits = np.log(np.array([[0.4, 0.25, 0.2, 0.1, 0.05]], np.float32))
    for top_k, top_p, seed in ((-1, 1.0, 123), (3, 1.0, 2**62 + 7), (-1, 0.7, 0)):
        params = SamplingParams(do_sample=True, top_k=top_k, top_p=top_p)
        rows = [RowState(params, PenaltyCounts(), step, seed) for step in range(4000)]
        batch = build_sampling_batch(rows, [], 5, "cpu")
        tokens, _ = Sampler().sample(torch.from_numpy(np.repeat(logits, 4000, 0)), batch)
        p = np.exp(logits[0].astype(np.float64))
        p *= ref_keep(p, top_k, top_p)
        p /= p.sum()
        observed = np.bincount(tokens.numpy(), minlength=5)
        assert observed[p == 0].sum() == 0
        nz = p > 0
        expected = 4000 * p[nz]
        chi2 = float((((observed[nz] - expected) ** 2) / expected).sum())
        assert chi2 < 25.0, (top_k, top_p, observed, expected)  # 4 dof: p-value ~ 5e-5


def test_inverse_cdf_never_picks_a_zero_weight() -> None:
    w = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0]] * 4)
    u = torch.tensor([0.0, 0.29, 0.31, 1.0 - 2.0**-53], dtype=torch.float64)
    assert sample_inverse_cdf(w, u).tolist() == [1, 1, 3, 3]


def test_row_uniforms() -> None:
    seeds = torch.tensor([0, 0, 1, 2**63 - 1, 12345] * 200, dtype=torch.int64)
    steps = torch.arange(1000, dtype=torch.int64)
    u = row_uniforms(seeds, steps)
    assert u.dtype == torch.float64 and bool(((u >= 0) & (u < 1)).all())
    assert len(set(u.tolist())) == 1000
    assert abs(float(u.mean()) - 0.5) < 0.03
    same = row_uniforms(torch.tensor([7, 7]), torch.tensor([3, 3]))
    assert same[0] == same[1]


def test_row_state_and_seeds() -> None:
    p = SamplingParams(input_penalty=True, seed=42, n=2, best_of=2)
    row = RowState.start(p, [5, 5, 6], seq_index=0)
    row.record(5)
    assert row.counts.get(5) == 3 and row.counts.get(6) == 1 and row.generated_len == 1
    assert row.seed == 42
    assert RowState.start(p, [], seq_index=1).seed not in (42, derive_seed(42, 2))
    assert derive_seed(42, 1) == derive_seed(42, 1)
    assert 0 <= derive_seed(None) < 2**63
    assert len(RowState.start(SamplingParams(), [1, 2]).counts) == 0


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_penalty_backend_on_cpu(backend: str) -> None:
    rng = np.random.default_rng(6)
    cases = [random_case(rng, 100) for _ in range(4)]
    logits = rng.normal(size=(4, 100)).astype(np.float32)
    batch = build_sampling_batch([c.state() for c in cases], EOS, 100, "cpu")
    shaped = Sampler(backend).shaped_logits(torch.from_numpy(logits), batch)  # type: ignore[arg-type]
    for b, case in enumerate(cases):
        np.testing.assert_allclose(shaped[b].numpy(), ref_shaped(logits[b], case, EOS), atol=1e-5)


def test_candidate_draw_equals_whole_vocabulary_draw() -> None:
    """The top-`mask_candidates` fast path draws exactly what the full-sort path draws."""
    import dataclasses

    from runtime.sampling.params import parse_sampling_params

    gen = torch.Generator().manual_seed(5)
    vocab = 3000
    logits = torch.randn(12, vocab, generator=gen) * 3  # [B, V]
    settings = [
        {"top_k": 5},
        {"top_p": 0.9},
        {"top_k": 40, "top_p": 0.5},
        {"top_p": 0.99, "temperature": 0.7},
    ]
    rows = []
    for i in range(12):
        params = parse_sampling_params({"do_sample": True, "seed": 100 + i, **settings[i % 4]})
        rows.append(RowState.start(params, [], 0))
    batch = build_sampling_batch(rows, [2], vocab, "cpu")
    assert 0 < batch.mask_candidates < vocab
    from runtime.sampling.sampler import _draw_from_candidates

    xt = logits / batch.temperature[:, None]
    lse = torch.logsumexp(xt, -1)
    assert _draw_from_candidates(xt, lse, torch.rand(12, dtype=torch.float64), batch) is not None
    fast = Sampler().sample(logits, batch)
    slow = Sampler().sample(logits, dataclasses.replace(batch, mask_candidates=0))
    assert torch.equal(fast[0], slow[0])
    assert torch.allclose(fast[1], slow[1])
