"""Prefix cache: the radix tree, the scheduler around it (slot accounting under an eviction storm
with aborts, siblings sharing a prompt, load figures), and on the real model: outputs identical
with and without the cache (greedy and seeded, all at once and one by one), reward scores."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

from runtime.engine.api import ScoreEvent, TokenEvent
from runtime.engine.args import EngineArgs
from runtime.engine.core import EngineCore, Request
from runtime.engine.prefix_cache import PrefixCache
from runtime.engine.scheduler import Scheduler, SchedulerConfig, Seq, SeqStatus
from runtime.sampling.params import SamplingParams, parse_sampling_params
from tests.server_helpers import make_tiny_reward_checkpoint


def make(capacity: int = 1000, batch_tokens: int = 64, max_reqs: int = 8) -> Scheduler:
    return Scheduler(SchedulerConfig(capacity, batch_tokens, max_reqs, router_token_ratio=0.0))


def step(s: Scheduler, token: int = 7) -> list[Seq]:
    """Schedule, pretend to forward, append `token` to each sampling chunk; returns finished."""
    plan = s.schedule()
    s.commit(plan)
    done = []
    for c in plan.chunks:
        if c.sample:
            c.seq.output_ids.append(token)
            if len(c.seq.output_ids) >= c.seq.max_new_tokens:
                s.finish(c.seq)
                done.append(c.seq)
    return done


def check_slots(s: Scheduler) -> None:
    """Every slot is exactly one of: free, owned by the tree, owned by one running sequence."""
    assert s.cache is not None
    free = s.allocator.free_list()
    tree = s.cache.all_slots()
    private = [x for q in s.running for x in q.slots[q.prefix_len :]]
    everything = free + tree + private
    assert sorted(everything) == list(range(s.cfg.capacity_tokens))
    assert len(tree) == s.cache.total_tokens
    held = {x for q in s.running for x in q.slots}
    assert s.allocator.num_used == len(held)  # shared slots count once
    for q in s.running:
        assert len(q.slots) >= q.num_computed >= q.prefix_len


# ---- the tree ---------------------------------------------------------------------------
def test_tree_match_insert_split_and_lru_eviction() -> None:
    c = PrefixCache()
    node, _, dup = c.insert(c.root, [1, 2, 3, 4], [10, 11, 12, 13])
    assert dup == [] and c.total_tokens == c.evictable_tokens == 4
    c.lock(node)
    other, tree, dup = c.insert(c.root, [1, 2, 9], [20, 21, 22])  # shares [1, 2]: a split
    assert tree == [10, 11, 22] and dup == [20, 21]
    assert c.total_tokens == 5 and c.evictable_tokens == 1  # [9] is unheld
    hit, slots = c.match([1, 2, 3, 4, 5], limit=3)  # stops inside [3, 4]: split again
    assert slots == [10, 11, 12] and hit.key == [3]
    assert c.evict(10) == [22]  # the held path stays
    c.unlock(node)
    assert c.evictable_tokens == 4 and c.locked_tokens == 0
    c.insert(c.root, [5, 6], [30, 31])
    c.match([1, 2, 3, 4], limit=4)  # [1..4] used last: [5, 6] goes first, tail first
    assert c.evict(1) == [31] and c.evict(2) == [30, 13]
    assert sorted(c.all_slots()) == [10, 11, 12]


# ---- the scheduler ----------------------------------------------------------------------
def test_second_request_attaches_the_prefix_and_counts() -> None:
    s = make(batch_tokens=64)
    prefix = list(range(100, 190))
    a = Seq(0, [*prefix, 1, 2], max_new_tokens=3)
    s.add(a)
    while s.has_work:
        step(s)
    assert s.allocator.num_used == 0 and s.cache is not None
    assert s.cache.total_tokens == len(a.prompt_ids) + 2  # prompt + the decoded outputs
    load = s.load()
    assert load.current_load == 0.0 and load.cached_tokens == s.cache.total_tokens
    b = Seq(1, [*prefix, 5], max_new_tokens=2)
    s.add(b)
    plan = s.schedule()
    assert [(c.start, c.length, c.sample) for c in plan.chunks] == [(90, 1, True)]
    assert b.cached_tokens == 90 and b.slots[:90] == s.cache.match(prefix, 90)[1]
    load = s.load()
    assert (load.prefix_queried_tokens, load.prefix_hit_tokens) == (92 + 91, 90)
    same = Seq(2, list(a.prompt_ids), max_new_tokens=1)  # a whole cached prompt: all but one
    s.add(same)
    s.commit(plan)
    plan = s.schedule()
    assert (plan.chunks[-1].seq, plan.chunks[-1].start, plan.chunks[-1].length) == (same, 91, 1)


def test_n_siblings_wait_for_the_prompt_and_share_its_slots() -> None:
    s = make(batch_tokens=32)
    prompt = list(range(50, 120))  # 70 tokens: three chunks of the first sequence
    sibs = [Seq(i, prompt, max_new_tokens=4) for i in range(3)]
    for q in sibs:
        s.add(q)
    starts = []
    for _ in range(4):
        plan = s.schedule()
        starts.append([(c.seq.seq_id, c.start, c.length) for c in plan.chunks])
        s.commit(plan)
        for c in plan.chunks:
            if c.sample:
                c.seq.output_ids.append(9)
        check_slots(s)
    assert starts[:3] == [[(0, 0, 32)], [(0, 32, 32)], [(0, 64, 6)]]
    assert starts[3] == [(0, 70, 1), (1, 69, 1), (2, 69, 1)]
    assert sibs[1].slots[:69] == sibs[0].slots[:69] == sibs[2].slots[:69]
    assert sibs[1].cached_tokens == sibs[2].cached_tokens == 69 and sibs[0].cached_tokens == 0
    # the siblings' recomputed last prompt token was a duplicate: published, it became the tree's
    assert sibs[1].slots[:70] == sibs[0].slots[:70]
    assert s.allocator.num_used == 70 + 1  # one prompt in the tree, the first one's decode


def test_abort_mid_prefill_publishes_only_what_was_computed() -> None:
    s = make(batch_tokens=16)
    q = Seq(0, list(range(40)), max_new_tokens=2)
    s.add(q)
    s.commit(s.schedule())  # 16 tokens computed
    s.schedule()  # 16 more planned (slots reserved), never computed
    q.aborted = True
    s.finish(q)
    assert s.cache is not None and s.cache.total_tokens == 16
    assert s.allocator.num_used == 0
    again = Seq(1, list(range(40)), max_new_tokens=2)
    s.add(again)
    s.schedule()
    assert again.cached_tokens == 16


def test_no_slot_leak_after_an_eviction_storm() -> None:
    rng = random.Random(0)
    s = make(capacity=300, batch_tokens=48, max_reqs=6)
    shared = [rng.randrange(1000) for _ in range(30)]
    seqs = []
    for i in range(200):
        head = shared[: rng.choice([0, 10, 30])]
        body = [rng.randrange(1000) for _ in range(rng.randint(1, 80))]
        seqs.append(Seq(i, head + body, max_new_tokens=rng.randint(1, 10)))
    for q in seqs:
        s.add(q)
    mid_prefill = 0
    for n in range(5000):
        prefilling = [q for q in s.running if q.prefilling]
        if (n % 4 == 1 and prefilling) or (n % 9 == 4 and s.running):  # abort
            victim = rng.choice(prefilling or s.running)
            mid_prefill += victim.prefilling
            victim.aborted = True
            s.finish(victim)
        step(s, token=rng.randrange(1000))
        check_slots(s)
        if not s.has_work:
            break
    assert not s.has_work and all(q.status is SeqStatus.FINISHED for q in seqs)
    assert s.cache is not None and s.cache.locked_tokens == 0  # no holder left
    assert s.allocator.num_idle + s.cache.total_tokens == 300
    assert s.load().current_load == 0.0
    assert s.prefix_queried_tokens > 10 * 300  # far more than the capacity went through
    assert s.cache.evicted_tokens > 5 * 300 and mid_prefill >= 20


def test_admission_counts_unheld_cached_slots_as_free() -> None:
    s = make(capacity=100, batch_tokens=100, max_reqs=4)
    a = Seq(0, list(range(60)), max_new_tokens=1, ignore_eos=True)
    s.add(a)
    while s.has_work:
        step(s)
    assert s.cache is not None and s.cache.total_tokens == 60 and s.allocator.num_idle == 40
    b = Seq(1, list(range(500, 570)), max_new_tokens=10, ignore_eos=True)  # needs 70 + 16
    s.add(b)
    step(s)
    assert b.status is SeqStatus.RUNNING  # 30 of the 60 cached slots were evicted for it
    assert s.cache.total_tokens == 30 + 70 and s.cache.locked_tokens == 70
    check_slots(s)


def test_disabled_cache_changes_nothing() -> None:
    s = Scheduler(SchedulerConfig(200, 64, 4, prefix_cache=False))
    for i in range(3):
        s.add(Seq(i, [1] * 20, max_new_tokens=2))
    while s.has_work:
        step(s)
    assert s.cache is None and s.allocator.num_idle == 200
    load = s.load()
    assert (load.cached_tokens, load.prefix_queried_tokens, load.prefix_hit_tokens) == (0, 0, 0)


def test_preemption_with_the_cache_finishes_everything() -> None:
    s = make(capacity=80, batch_tokens=100)
    s.cfg.router_token_ratio, s.cfg.router_max_new_token_len = 1.0, 1  # optimistic: overflows
    seqs = [Seq(i, [3] * 10 + [i] * 10, max_new_tokens=40) for i in range(3)]
    for q in seqs:
        s.add(q)
    for _ in range(500):
        step(s)
        check_slots(s)
        if not s.has_work:
            break
    assert all(len(q.output_ids) == 40 for q in seqs)
    assert s.allocator.num_used == 0 and s.cache is not None and s.cache.locked_tokens == 0


# ---- the real model ---------------------------------------------------------------------
def run_all(core: EngineCore, prompts: list[list[int]], params: list[SamplingParams], gap: int):
    """Submit request i at step i * gap; tokens and the last event's cached_tokens per request."""
    reqs: list[Request | None] = [None] * len(prompts)
    out: list[list[int]] = [[] for _ in prompts]
    cached = [0] * len(prompts)
    n = 0
    while not all(r is not None and r.done for r in reqs):
        for i in range(len(prompts)):
            if reqs[i] is None and i * gap <= n:
                reqs[i] = core.new_request(i, prompts[i], params[i], score=False)
                core.submit(reqs[i])  # type: ignore[arg-type]
        for req, ev in core.step():
            assert isinstance(ev, TokenEvent)
            k = reqs.index(req)
            out[k].append(ev.token_id)
            cached[k] = ev.cached_tokens
        n += 1
        assert n < 20_000
    assert core.scheduler.allocator.num_used == 0
    return out, cached


@pytest.mark.slow
def test_outputs_identical_with_and_without_the_cache(default_model_dir: object) -> None:
    """Dense weights (`--quant_type none`, fbgemm fp16): the cached and uncached paths agree to
    fp32 rounding, and greedy and seeded outputs are the same tokens. (The quantized modes'
    paths also agree to rounding, per linear; int16 rounds every layer's input to int16, which
    turns rounding-level differences into whole steps: the next test bounds its logits
    instead; README, "CPU weights".)"""
    from runtime.engine.loader import load_runner

    args = EngineArgs(
        max_total_token_num=20_000,
        batch_max_tokens=512,
        running_max_req_size=64,
        quant_type="none",
    )
    runner, tok = load_runner(args)
    rng = random.Random(5)
    words = "river stone lamp quiet garden letter window morning orange bridge".split()
    prefix = tok.encode(" ".join(rng.choice(words) for _ in range(600)))[:500]
    prompts = [prefix + tok.encode(f" question {i}: {rng.choice(words)}?") for i in range(64)]
    seeded = {"do_sample": True, "temperature": 0.9, "top_p": 0.9, "max_new_tokens": 5}
    params = [
        parse_sampling_params({**seeded, "seed": 100 + i})
        if i % 2
        else SamplingParams(max_new_tokens=5)
        for i in range(64)
    ]
    no_cache = EngineCore(runner, tok, replace(args, disable_dynamic_prompt_cache=True))
    ref, _ = run_all(no_cache, prompts, params, 0)
    for gap in (0, 2):  # all at once, then one by one on a cold cache
        core = EngineCore(runner, tok, args)
        out, cached = run_all(core, prompts, params, gap)
        assert out == ref
        assert cached[0] == 0 and min(cached[1:]) >= 500
        load = core.load_figures
        assert load.prefix_hit_tokens >= 63 * 500 and load.current_load == 0.0


@pytest.mark.slow
def test_int16_logits_with_a_cached_prefix(default_model_dir: object) -> None:
    """The default int16 mode: a prompt's last logits with its 500-token prefix read from the
    KV pool (the suffix through the int16 GEMV) against the whole prompt in one prefill (the
    fp32 path on the same rounded activations): within 1e-2 (measured 2-3e-3; int16 against
    the fp32 model is 1.9e-2; a wrong cached K/V moves them by O(1)), same greedy token."""
    import torch

    from runtime.engine.loader import load_runner
    from runtime.model.batch import SeqChunk

    runner, tok = load_runner(EngineArgs(max_total_token_num=2048))
    rng = random.Random(5)
    words = "river stone lamp quiet garden letter window morning orange bridge".split()
    ids = tok.encode(" ".join(rng.choice(words) for _ in range(600)))[:500]
    ids += tok.encode(" question 15: lamp?")
    whole = runner.logits(runner.run(runner.prepare([SeqChunk(ids, 0, list(range(len(ids))))])))
    slots = list(range(1024, 1024 + len(ids)))
    runner.run(runner.prepare([SeqChunk(ids[:500], 0, slots)]))
    part = runner.logits(runner.run(runner.prepare([SeqChunk(ids[500:], 500, slots)])))
    assert (whole - part).abs().max().item() <= 1e-2
    assert torch.equal(whole.argmax(-1), part.argmax(-1))


def test_reward_scores_agree_with_the_cache(tmp_path: Path) -> None:
    from runtime.engine.loader import load_runner

    folder = make_tiny_reward_checkpoint(tmp_path, "internlm2_reward")
    args = EngineArgs(model_dir=str(folder), max_total_token_num=4096, batch_max_tokens=64)
    runner, tok = load_runner(args)
    system = tok.encode("<|im_start|>system\n" + "be kind and brief " * 12 + "<|im_end|>\n")
    prompts = [
        system + tok.encode(f"<|im_start|>user\nq{i}<|im_end|>\n<|reward|>") for i in range(6)
    ]
    scores: dict[bool, list[float]] = {}
    for disable in (True, False):
        core = EngineCore(runner, tok, replace(args, disable_dynamic_prompt_cache=disable))
        got: list[ScoreEvent] = []
        for p in [*prompts, prompts[0]]:
            req = core.new_request(0, p, SamplingParams(max_new_tokens=1), score=True)
            core.submit(req)
            while not req.done:
                got += [ev for _, ev in core.step() if isinstance(ev, ScoreEvent)]
        scores[disable] = [ev.score for ev in got]
        if not disable:
            assert got[0].cached_tokens == 0 and min(ev.cached_tokens for ev in got[1:]) > 0
            assert got[-1].cached_tokens == len(prompts[0]) - 1
    # the reward path agrees across chunkings to fp32 rounding (tests/test_engine_reward.py)
    assert scores[False] == pytest.approx(scores[True], abs=1e-5)


# ---- the benchmark's prefix workloads ----------------------------------------------------
def test_bench_shared_prefix_and_multi_turn_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    profiling = str(Path(__file__).resolve().parent.parent / "profiling")
    if profiling not in sys.path:
        sys.path.insert(0, profiling)
    import bench_prompts as bp
    import bench_serving as bs

    def words(text: str) -> int:
        return len(text.split())

    monkeypatch.setattr(bp, "make_token_counter", lambda args: (words, "words"))
    args = bs.build_parser().parse_args(["--shared-prefix-len", "40", "--multi-turn", "3"])
    args.warmup = 1
    prompts, info = bp.build_prompts(args, 1 + 6)
    assert info["shared_prefix_tokens"] == 40 and info["multi_turn"] == 3
    head = prompts[0][: prompts[0].index("\n") + 1]
    assert words(head) == 40 and all(p.startswith(head) for p in prompts)
    assert prompts[2].startswith(prompts[1]) and prompts[3].startswith(prompts[2])
    assert prompts[4].startswith(head + "Conversation 0001.")
    assert len(prompts[3]) - len(prompts[2]) < len(prompts[1]) - len(head)  # follow-ups are short
    results = [bs.RequestResult(i, ok=True, ttft=0.1 * (i % 3 + 1)) for i in range(6)]
    by_turn = bs.ttft_by_turn(results, 3)
    assert {k: round(v["p50_ms"]) for k, v in by_turn.items()} == {"1": 100, "2": 200, "3": 300}
    with pytest.raises(SystemExit):
        bs.main(["--multi-turn", "3", "--num-prompts", "4"])
