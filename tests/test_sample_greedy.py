"""The one-pass greedy kernel (runtime/kernels/cpu/sample_greedy.py) against torch's argmax and
log-softmax, including ties, NaN, infinities and rows spread over threads."""

from __future__ import annotations

import pytest
import torch

from runtime.kernels.cpu import sample_greedy


def _reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's argmax, and the log-softmax at it in fp64 (the kernel sums in fp64 relative to
    the row's max: with logits near 1e4, torch's fp32 logsumexp is off by ~1e-3, not it)."""
    tokens = x.argmax(dim=-1)  # [B]
    xd = x.double()  # [B, V]
    logprob = xd.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(xd, dim=-1)  # [B]
    return tokens, logprob.float()


def _check(x: torch.Tensor) -> None:
    tokens, logprob = sample_greedy.greedy_logprob_torch(x)
    ref_tokens, ref_logprob = _reference(x)
    assert tokens.dtype == torch.int64 and logprob.dtype == torch.float32
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logprob, ref_logprob, rtol=1e-5, atol=2e-5, equal_nan=True)


@pytest.mark.parametrize("rows", [1, 3, sample_greedy.PARALLEL_MIN_ROWS + 3])
@pytest.mark.parametrize("vocab", [7, 2048, 2049, 49_152])
def test_matches_torch_on_random_logits(rows: int, vocab: int) -> None:
    g = torch.Generator().manual_seed(rows * 100_000 + vocab)
    _check(torch.randn(rows, vocab, generator=g) * 6)  # [B, V]


def test_wide_and_peaked_rows() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 49_152, generator=g)  # [B, V]
    x[0] *= 60  # values far below the max: their e^z underflows
    x[1, 40_000] = 80.0  # one token takes nearly all the mass, late in the row
    x[2] = x[2] - 1e4  # large offsets: the running max is what keeps e^z in range
    x[3, ::3] = -torch.inf  # masked tokens
    _check(x)


def test_ties_take_the_first_index_across_blocks() -> None:
    x = torch.zeros(3, 5000)  # [B, V]
    x[0, [10, 4000]] = 3.0  # in two different blocks
    x[1, [2100, 2101]] = 3.0  # in one block
    x[2, :] = 1.5  # every token ties
    _check(x)
    assert sample_greedy.greedy_logprob_torch(x)[0].tolist() == [10, 2100, 0]


def test_nan_and_infinities_behave_like_torch() -> None:
    x = torch.randn(5, 3000, generator=torch.Generator().manual_seed(2))  # [B, V]
    x[0, 2500] = torch.nan
    x[1, 100] = torch.inf
    x[2, :] = -torch.inf
    x[3, [5, 2999]] = torch.inf
    x[4, 7] = -torch.nan
    _check(x)


def test_the_sampler_uses_the_kernel_it_was_given() -> None:
    """An all-greedy batch goes to the backends' kernel (and gives torch's answer); a sampled
    batch does not."""
    from runtime.sampling.params import SamplingParams
    from runtime.sampling.sampler import PenaltyCounts, RowState, Sampler, build_sampling_batch

    calls: list[int] = []

    def kernel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(x.shape[0])
        return sample_greedy.greedy_logprob_torch(x)

    x = torch.randn(3, 5000, generator=torch.Generator().manual_seed(3))  # [B, V]
    rows = [RowState(SamplingParams(), PenaltyCounts(), 3, i) for i in range(3)]
    tokens, logprob = Sampler(greedy=kernel).sample(x, build_sampling_batch(rows, [], 5000, "cpu"))
    ref_tokens, ref_logprob = _reference(x)
    assert calls == [3] and torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logprob, ref_logprob, rtol=1e-5, atol=2e-5)
    drawn = [RowState(SamplingParams(do_sample=True), PenaltyCounts(), 3, i) for i in range(3)]
    Sampler(greedy=kernel).sample(x, build_sampling_batch(drawn, [], 5000, "cpu"))
    assert calls == [3]
