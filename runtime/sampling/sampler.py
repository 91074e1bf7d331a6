"""Batched logit pipeline (DESIGN.md, "Sampling"): penalties -> EOS shaping -> temperature -> top-k/top-p -> sample.

Every row's random draw comes from a counter-based generator keyed by (seed, step): one
uniform per row from an integer hash, then inverse-CDF sampling over the row's masked
probabilities in vocabulary order. So a request's tokens do not depend on the rest of the batch
or on its row index. `Sampler.sample` runs no per-row Python loop and no host synchronisation.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from cuda import penalties, penalties_numba
from runtime.sampling.params import MAX_SEED, SamplingParams

PenaltyBackend = Literal["auto", "torch", "numba"]
# fp32 logits [B, V] -> (argmax [B] int64, log-softmax at it [B] fp32)
GreedyFn = Callable[[Tensor], tuple[Tensor, Tensor]]
_M32 = 0xFFFFFFFF


class PenaltyCounts:
    """Sparse token -> count multiset of one sequence (generated tokens, plus the prompt
    when `input_penalty`)."""

    __slots__ = ("_counts",)

    def __init__(self, tokens: Iterable[int] = ()) -> None:
        self._counts: dict[int, int] = dict(Counter(tokens))

    def add(self, token_id: int) -> None:
        """Count one more occurrence of `token_id`."""
        self._counts[token_id] = self._counts.get(token_id, 0) + 1

    def get(self, token_id: int) -> int:
        return self._counts.get(token_id, 0)

    def items(self) -> Iterator[tuple[int, int]]:
        return iter(self._counts.items())

    def __len__(self) -> int:
        return len(self._counts)


def derive_seed(seed: int | None, seq_index: int = 0) -> int:
    """The seed of sequence `seq_index` of a request: the request's seed for sequence 0, a hash of
    (seed, index) for the others (so n > 1 seeded samples differ); random when unseeded."""
    if seed is None:
        return secrets.randbits(63)
    if seq_index == 0:
        return seed
    x = (seed ^ (seq_index * 0x9E3779B97F4A7C15)) & 0xFFFFFFFFFFFFFFFF  # splitmix64 finaliser
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & MAX_SEED


@dataclass
class RowState:
    """Per-sequence sampling state kept by the engine between steps."""

    params: SamplingParams
    counts: PenaltyCounts = field(default_factory=PenaltyCounts)
    generated_len: int = 0
    seed: int = 0

    @classmethod
    def start(
        cls,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        seq_index: int = 0,
        default_seed: int | None = None,
    ) -> RowState:
        """The state of a new sequence (counts seeded with the prompt when input_penalty);
        an unseeded request draws from `default_seed` (the engine's generator), else at random."""
        counts = PenaltyCounts(prompt_ids if params.input_penalty else ())
        seed = params.seed if params.seed is not None else default_seed
        return cls(params, counts, 0, derive_seed(seed, seq_index))

    def record(self, token_id: int) -> None:
        """Account for one generated token."""
        self.counts.add(token_id)
        self.generated_len += 1


@dataclass
class SamplingBatch:
    """Per-step tensors of B rows (all on the logits' device), plus host-side fast-path flags."""

    temperature: Tensor  # [B] fp32, 1.0 on greedy rows
    top_p: Tensor  # [B] fp32
    top_k: Tensor  # [B] int64, vocab size for "whole vocabulary"
    greedy: Tensor  # [B] bool
    token_ids: Tensor  # [N] int64, penalty CSR
    counts: Tensor  # [N] int32
    row_ptr: Tensor  # [B+1] int64
    repetition: Tensor  # [B] fp32
    frequency: Tensor  # [B] fp32
    presence: Tensor  # [B] fp32
    eos_ids: Tensor  # [E] int64
    generated_len: Tensor  # [B] int64
    min_new_tokens: Tensor  # [B] int64
    decay_start: Tensor  # [B] int64
    decay_factor: Tensor  # [B] fp32
    seeds: Tensor  # [B] int64, in [0, 2**63)
    steps: Tensor  # [B] int64, the draw counter (= generated_len)
    all_greedy: bool = False
    any_greedy: bool = False
    needs_penalties: bool = False  # N > 0
    needs_eos_shaping: bool = False  # some EOS logit changes this step
    needs_mask: bool = False  # some sampled row has top_k < V or top_p < 1
    mask_candidates: int = 0  # top-k/top-p look at this many best tokens first (0 = full sort)


@dataclass
class _Columns:
    """The rows' sampling state as host lists, one entry per row (penalty pairs in CSR form)."""

    temperature: list[float] = field(default_factory=list)
    top_p: list[float] = field(default_factory=list)
    top_k: list[int] = field(default_factory=list)
    greedy: list[bool] = field(default_factory=list)
    repetition: list[float] = field(default_factory=list)
    frequency: list[float] = field(default_factory=list)
    presence: list[float] = field(default_factory=list)
    gen_len: list[int] = field(default_factory=list)
    min_new: list[int] = field(default_factory=list)
    decay_start: list[int] = field(default_factory=list)
    decay_factor: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    row_ptr: list[int] = field(default_factory=lambda: [0])
    needs_mask: bool = False
    needs_eos: bool = False
    max_k: int = 0  # largest top_k among the masked rows (vocab_size if one keeps it all)

    def add(self, row: RowState, vocab_size: int) -> None:
        p = row.params
        g = p.greedy
        k = vocab_size if p.top_k == -1 else min(p.top_k, vocab_size)
        self.greedy.append(g)
        self.temperature.append(1.0 if g else p.temperature)
        self.top_k.append(vocab_size if g else k)
        self.top_p.append(1.0 if g else p.top_p)
        if not g and (k < vocab_size or p.top_p < 1.0):
            self.needs_mask = True
            self.max_k = max(self.max_k, k)
        self.repetition.append(p.repetition_penalty)
        self.frequency.append(p.frequency_penalty)
        self.presence.append(p.presence_penalty)
        if p.has_penalties and len(row.counts) > 0:
            for tok, c in row.counts.items():
                self.token_ids.append(tok)
                self.counts.append(c)
        self.row_ptr.append(len(self.token_ids))
        start, factor = p.exponential_decay_length_penalty
        n = row.generated_len
        self.gen_len.append(n)
        self.min_new.append(p.min_new_tokens)
        self.decay_start.append(start)
        self.decay_factor.append(factor)
        self.needs_eos |= n < p.min_new_tokens - 1 or (factor != 1.0 and n > start)
        self.seeds.append(row.seed)


def build_sampling_batch(
    rows: Sequence[RowState], eos_ids: list[int], vocab_size: int, device: torch.device | str
) -> SamplingBatch:
    """Gather the rows' Python state into tensors on `device` (host work, once per step)."""
    eos = sorted({e for e in eos_ids if 0 <= e < vocab_size})
    c = _Columns()
    for row in rows:
        c.add(row, vocab_size)

    def t(values: list, dtype: torch.dtype) -> Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    i64, f32 = torch.int64, torch.float32
    return SamplingBatch(
        temperature=t(c.temperature, f32),
        top_p=t(c.top_p, f32),
        top_k=t(c.top_k, i64),
        greedy=t(c.greedy, torch.bool),
        token_ids=t(c.token_ids, i64),
        counts=t(c.counts, torch.int32),
        row_ptr=t(c.row_ptr, i64),
        repetition=t(c.repetition, f32),
        frequency=t(c.frequency, f32),
        presence=t(c.presence, f32),
        eos_ids=t(eos, i64),
        generated_len=t(c.gen_len, i64),
        min_new_tokens=t(c.min_new, i64),
        decay_start=t(c.decay_start, i64),
        decay_factor=t(c.decay_factor, f32),
        seeds=t(c.seeds, i64),
        steps=t(c.gen_len, i64),
        all_greedy=all(c.greedy),
        any_greedy=any(c.greedy),
        needs_penalties=len(c.token_ids) > 0,
        needs_eos_shaping=bool(eos) and c.needs_eos,
        needs_mask=c.needs_mask,
        mask_candidates=min(vocab_size, max(c.max_k, 64) if c.max_k < vocab_size else CANDIDATES),
    )


# ---------------------------------------------------------------- counter-based uniforms


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) held in int64, with no int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32  # products < 2**48


def _hash32(x: Tensor) -> Tensor:
    """lowbias32 (C. Wellons) on 32-bit lanes held in int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_uniforms(seeds: Tensor, steps: Tensor) -> Tensor:
    """One uniform in [0, 1) per row, a pure function of (seed, step). [B] int64 -> [B] fp64."""
    k = _hash32((seeds & _M32) ^ 0x9E3779B9)  # [B]
    k = _hash32(k ^ ((seeds >> 32) & _M32))
    k = _hash32(k ^ (steps & _M32))
    k = _hash32(k ^ ((steps >> 32) & _M32) ^ 0x85EBCA6B)
    a = _hash32(k ^ 0x68E31DA4) >> 5  # 27 bits
    b = _hash32(k ^ 0x1B56C4E9) >> 6  # 26 bits
    return ((a << 26) | b).to(torch.float64) * 2.0**-53  # [B]


# ---------------------------------------------------------------- masking and drawing


CANDIDATES = 1024  # top-p over the whole vocabulary first tries the 1024 most likely tokens


def topk_topp_mask(probs: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Tokens kept by top-k/top-p, in vocabulary order. [B, V] -> [B, V] bool.

    Sorted descending (stably), a token is dropped when its rank >= top_k or when the
    *exclusive* cumulative probability before it is > top_p (the token crossing top_p is kept);
    top_p >= 1 keeps every token.
    """
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # [B, V]
    exclusive = sorted_p.cumsum(dim=-1) - sorted_p  # [B, V]
    ranks = torch.arange(probs.shape[-1], device=probs.device)  # [V]
    keep_sorted = (ranks[None, :] < top_k[:, None]) & (
        (exclusive <= top_p[:, None]) | (top_p[:, None] >= 1.0)
    )  # [B, V]
    return torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)  # [B, V]


def sample_inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """Draw index i with probability weights[i] / sum(weights), by inverse CDF in vocab order.

    [B, V] non-negative, [B] fp64 uniforms in [0, 1) -> [B] int64; never picks a zero weight.
    """
    cdf = weights.to(torch.float64).cumsum(dim=-1)  # [B, V]
    total = cdf[:, -1]  # [B]
    # u * total may round up to total; keep the target strictly below it.
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # [B]
    idx = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]  # [B]
    return idx.clamp_max(weights.shape[-1] - 1)  # [B]


def greedy_logprob(x: Tensor) -> tuple[Tensor, Tensor]:
    """The torch path of an all-greedy batch: (argmax [B] int64, log-softmax at it [B]) of fp32
    logits `x` [B, V] (`GreedyFn`; the backends may bring a one-pass kernel instead)."""
    tokens = x.argmax(dim=-1)  # [B]
    chosen = x.gather(1, tokens[:, None])[:, 0]  # [B]
    return tokens, chosen - torch.logsumexp(x, dim=-1)


class Sampler:
    """Turns a step's logits into one token (and its logprob) per row."""

    def __init__(
        self, penalty_backend: PenaltyBackend = "auto", greedy: GreedyFn | None = None
    ) -> None:
        self.penalty_backend = penalty_backend
        self.greedy = greedy  # the device's one-pass greedy kernel (the model's backends)

    def _use_numba(self, logits: Tensor) -> bool:
        if self.penalty_backend == "torch" or not logits.is_cuda:
            return False
        return self.penalty_backend == "numba" or penalties_numba.available()

    def shaped_logits(self, logits: Tensor, batch: SamplingBatch) -> Tensor:
        """fp32 copy of `logits` after penalties and EOS shaping (DESIGN.md, "Sampling": steps 1-2). [B, V]"""
        x = logits.to(torch.float32, copy=True).contiguous()  # [B, V]
        if not (batch.needs_penalties or batch.needs_eos_shaping):
            return x
        args = (
            batch.token_ids,
            batch.counts,
            batch.row_ptr,
            batch.repetition,
            batch.frequency,
            batch.presence,
            batch.eos_ids,
            batch.generated_len,
            batch.min_new_tokens,
            batch.decay_start,
            batch.decay_factor,
        )
        if self._use_numba(x):
            penalties_numba.apply_penalties_cuda_(x, *args)
        else:
            penalties.apply_penalties_(x, *args)
        return x

    def sample(self, logits: Tensor, batch: SamplingBatch) -> tuple[Tensor, Tensor]:
        """(token_ids [B] int64, logprobs [B] fp32); logprob = log p(token) after penalties and
        temperature, before top-k/top-p. `logits` [B, V] is not modified.

        Full [B, V] passes only where needed: no copy without penalties or EOS shaping; greedy
        batches: argmax + logsumexp; sampled: temperature, logsumexp, the top candidates."""
        shaping = batch.needs_penalties or batch.needs_eos_shaping
        x = self.shaped_logits(logits, batch) if shaping else logits.float()  # [B, V]
        if batch.all_greedy:
            return (self.greedy or greedy_logprob)(x.contiguous())

        xt = x / batch.temperature[:, None]  # [B, V] (a new tensor: `logits` stays as it was)
        lse = torch.logsumexp(xt, dim=-1)  # [B]
        u = row_uniforms(batch.seeds, batch.steps)  # [B] fp64
        drawn = None
        if batch.needs_mask and 0 < batch.mask_candidates < x.shape[-1]:
            drawn = _draw_from_candidates(xt, lse, u, batch)
        if drawn is None:  # whole-vocabulary path
            probs = (xt - lse[:, None]).exp()  # [B, V]
            if batch.needs_mask:
                probs = probs * topk_topp_mask(probs, batch.top_k, batch.top_p)  # [B, V]
            drawn = sample_inverse_cdf(probs, u)  # [B]
        tokens = torch.where(batch.greedy, x.argmax(dim=-1), drawn) if batch.any_greedy else drawn
        return tokens, xt.gather(1, tokens[:, None])[:, 0] - lse


def _draw_from_candidates(
    xt: Tensor, lse: Tensor, u: Tensor, batch: SamplingBatch
) -> Tensor | None:
    """The same draw as the whole-vocabulary path, over the `mask_candidates` best tokens only.

    None when some row's kept set may reach past the candidates (one host check).
    """
    n_cand = batch.mask_candidates
    vals, idx = xt.topk(n_cand, dim=-1)  # [B, C] descending
    probs = (vals - lse[:, None]).exp()  # [B, C]
    decided = (batch.top_k <= n_cand) | ((batch.top_p < 1.0) & (probs.sum(-1) > batch.top_p))
    if not bool(decided.all()):
        return None
    exclusive = probs.cumsum(dim=-1) - probs  # [B, C]
    ranks = torch.arange(n_cand, device=xt.device)  # [C]
    keep = (ranks[None, :] < batch.top_k[:, None]) & (
        (exclusive <= batch.top_p[:, None]) | (batch.top_p[:, None] >= 1.0)
    )  # [B, C]
    vocab_order, perm = idx.sort(
        dim=-1
    )  # [B, C]: kept weights in vocabulary order, as the full path
    weights = (probs * keep).gather(1, perm)  # [B, C]
    return vocab_order.gather(1, sample_inverse_cdf(weights, u)[:, None])[:, 0]  # [B]
