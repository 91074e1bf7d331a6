"""Scheduler: admission estimate, chunked prefill, slot accounting, preemption (no torch needed)."""

from __future__ import annotations

import random
import subprocess
import sys

from runtime.engine.scheduler import Scheduler, SchedulerConfig, Seq, SeqStatus


def make(
    capacity: int = 1000,
    batch_tokens: int = 64,
    max_reqs: int = 8,
    ratio: float = 0.0,
    prefix_cache: bool = False,
) -> Scheduler:
    """A scheduler; without the prefix cache unless asked (tests/test_prefix_cache.py covers it)."""
    cfg = SchedulerConfig(
        capacity, batch_tokens, max_reqs, router_token_ratio=ratio, prefix_cache=prefix_cache
    )
    return Scheduler(cfg)


def run_step(s: Scheduler, next_token: int = 7) -> list[Seq]:
    """Schedule, pretend to forward, append a token to each sampling chunk; returns finished seqs."""
    plan = s.schedule()
    s.commit(plan)
    done = []
    for c in plan.chunks:
        if c.sample:
            c.seq.output_ids.append(next_token)
            if len(c.seq.output_ids) >= c.seq.max_new_tokens:
                s.finish(c.seq)
                done.append(c.seq)
    return done


def test_scheduler_imports_no_torch() -> None:
    code = (
        "import sys, runtime.engine.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_peak_formula_matches_spec() -> None:
    s = make(ratio=0.0)  # always "busy": b = max_new - out
    a = Seq(0, [1] * 10, max_new_tokens=20)
    b = Seq(1, [1] * 5, max_new_tokens=50)
    # b_i sorted desc: (b=56, a=6), (b=26, a=11) -> max(56*1+6, 26*2+6+11) = 69
    assert s.peak_tokens([a, b], busy=True) == 69


def test_chunked_prefill_respects_budget_and_decodes_first() -> None:
    s = make(batch_tokens=16)
    long = Seq(0, list(range(40)), max_new_tokens=3)
    s.add(long)
    plan = s.schedule()
    assert [(c.start, c.length, c.sample) for c in plan.chunks] == [(0, 16, False)]
    s.commit(plan)
    short = Seq(1, [1, 2, 3], max_new_tokens=2)
    s.add(short)
    plan = s.schedule()
    assert [(c.seq.seq_id, c.length) for c in plan.chunks] == [
        (0, 16)
    ]  # budget spent on the long one
    s.commit(plan)
    plan = s.schedule()  # 8 left of the long prompt, then the short one is admitted
    assert [(c.seq.seq_id, c.start, c.length, c.sample) for c in plan.chunks] == [
        (0, 32, 8, True),
        (1, 0, 3, True),
    ]
    s.commit(plan)
    for c in plan.chunks:
        c.seq.output_ids.append(5)
    plan = s.schedule()
    assert plan.num_decode == 2 and all(c.length == 1 for c in plan.chunks)


def test_slots_are_freed_after_finish_and_abort() -> None:
    rng = random.Random(0)
    s = make(capacity=400, batch_tokens=32, max_reqs=6)
    seqs = [Seq(i, [1] * rng.randint(1, 60), max_new_tokens=rng.randint(1, 12)) for i in range(20)]
    for q in seqs:
        s.add(q)
    for step in range(400):
        if step % 7 == 3 and s.running:  # abort mid-prefill or mid-decode
            s.finish(rng.choice(s.running))
        if step % 11 == 5 and s.waiting:
            s.finish(s.waiting[0])
        run_step(s)
        used = sum(len(q.slots) for q in s.running)
        assert s.allocator.num_used == used
        if not s.has_work:
            break
    assert not s.has_work
    assert s.allocator.num_used == 0
    load = s.load()
    assert load.current_load == 0.0
    assert all(q.status is SeqStatus.FINISHED for q in seqs)


def test_admission_bounded_by_capacity_and_request_count() -> None:
    s = make(capacity=100, batch_tokens=1000, max_reqs=3, ratio=0.0)
    for i in range(5):
        s.add(Seq(i, [1] * 10, max_new_tokens=10, ignore_eos=True))
    s.schedule()
    # each needs a=11 and b=16: peak of 3 = 16*3 + 33 = 81 < 100; a 4th would be 64+44 = 108
    assert len(s.running) == 3
    s2 = make(capacity=100, batch_tokens=1000, max_reqs=10, ratio=0.0)
    for i in range(5):
        s2.add(Seq(i, [1] * 10, max_new_tokens=10, ignore_eos=True))
    s2.schedule()
    assert len(s2.running) == 3


def test_preemption_when_optimistic_estimate_overflows() -> None:
    s = make(capacity=60, batch_tokens=100, max_reqs=8, ratio=1.0)  # never busy: optimistic
    s.cfg.router_max_new_token_len = 1
    a, b = Seq(0, [1] * 20, max_new_tokens=40), Seq(1, [1] * 20, max_new_tokens=40)
    s.add(a)
    s.add(b)
    finished: list[Seq] = []
    for _ in range(300):
        finished += run_step(s)
        assert s.allocator.num_used <= 60
        if not s.has_work:
            break
    assert {q.seq_id for q in finished} == {0, 1}
    assert all(len(q.output_ids) == 40 for q in finished)
    assert s.allocator.num_used == 0


def test_held_sequences_sit_out_of_decode_and_keep_their_slots() -> None:
    from runtime.engine.api import Hold

    s = make()
    hold = Hold()
    a, b = Seq(0, [1, 2, 3], max_new_tokens=50, hold=hold), Seq(1, [4, 5], max_new_tokens=50)
    s.add(a)
    s.add(b)
    run_step(s)  # both prefill and sample their first token
    hold.held = True
    slots_a = list(a.slots)
    plan = s.schedule()
    assert [c.seq for c in plan.chunks] == [b]  # only b decodes
    s.commit(plan)
    assert a.slots == slots_a and a.status is SeqStatus.RUNNING  # KV kept
    b.output_ids.append(7)
    s.finish(b)
    assert not s.has_work  # the only running sequence is held: nothing to step
    hold.held = False
    assert s.has_work
    plan = s.schedule()
    assert [(c.seq, c.start, c.length) for c in plan.chunks] == [
        (a, 3, 1)
    ]  # its first output token
