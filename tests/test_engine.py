"""Engine on the real default model: batch invariance, seeded sampling, slot accounting, Trio API."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

import pytest
import trio

from runtime.engine.api import ScoreEvent, TokenEvent
from runtime.engine.args import EngineArgs
from runtime.engine.async_engine import AsyncEngine
from runtime.engine.core import EngineCore, Request
from runtime.engine.loader import load_runner
from runtime.sampling.params import SamplingParams, parse_sampling_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def core(default_model_dir: object) -> EngineCore:
    args = EngineArgs(max_total_token_num=16384, batch_max_tokens=256, running_max_req_size=64)
    runner, tokenizer = load_runner(args)
    return EngineCore(runner, tokenizer, args)


def run_requests(
    core: EngineCore,
    prompts: Sequence[list[int]],
    params: Sequence[SamplingParams],
    arrival_steps: Sequence[int] | None = None,
) -> list[list[int]]:
    """Submit request i at step arrival_steps[i]; step until all finish; tokens per request."""
    arrival = list(arrival_steps or [0] * len(prompts))
    reqs: list[Request | None] = [None] * len(prompts)
    out: list[list[int]] = [[] for _ in prompts]
    step = 0
    while True:
        for i, at in enumerate(arrival):
            if at == step and reqs[i] is None:
                reqs[i] = core.new_request(1000 + i, prompts[i], params[i], score=False)
                core.submit(reqs[i])  # type: ignore[arg-type]
        if all(r is not None and r.done for r in reqs):
            break
        for req, ev in core.step():
            assert isinstance(ev, TokenEvent)
            out[reqs.index(req)].append(ev.token_id)
        step += 1
        assert step < 5000
    assert core.scheduler.allocator.num_used == 0
    return out


def mixed_prompts(core: EngineCore, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    text = (
        "The history of the city library began when a group of teachers collected books for "
        "the children of the town. Over many years it grew into a large building with "
    )
    base = core.tokenizer.encode(text * 12)
    lengths = [5, 300] + [rng.randint(5, 300) for _ in range(n - 2)]
    return [base[i : i + n_tok] for i, n_tok in enumerate(lengths)]


def test_batch_invariance_greedy(core: EngineCore) -> None:
    prompts = mixed_prompts(core, 16, seed=1)
    params = [SamplingParams(max_new_tokens=12 + (i % 5), ignore_eos=True) for i in range(16)]
    batched = run_requests(core, prompts, params, arrival_steps=[(i * 3) % 20 for i in range(16)])
    for i in range(16):
        alone = run_requests(core, [prompts[i]], [params[i]])[0]
        assert batched[i] == alone, f"request {i} (prompt {len(prompts[i])} tokens) differs"


def test_seeded_sampling_alone_equals_in_busy_batch(core: EngineCore) -> None:
    prompts = mixed_prompts(core, 8, seed=2)
    seeded = parse_sampling_params(
        {
            "do_sample": True,
            "temperature": 0.9,
            "top_p": 0.95,
            "top_k": 50,
            "seed": 1234,
            "max_new_tokens": 16,
            "ignore_eos": True,
            "frequency_penalty": 0.5,
        }
    )
    noisy = [
        parse_sampling_params({"do_sample": True, "temperature": 1.3, "max_new_tokens": 20})
        for _ in range(7)
    ]
    alone = run_requests(core, [prompts[0]], [seeded])[0]
    assert run_requests(core, [prompts[0]], [seeded])[0] == alone
    batch_prompts = [prompts[1], prompts[0], *prompts[2:]]
    batch_params = [noisy[0], seeded, *noisy[1:]]
    busy = run_requests(core, batch_prompts, batch_params, [0, 2, 0, 1, 3, 0, 5, 1])
    assert busy[1] == alone


def test_engine_seed_makes_unseeded_sampling_reproducible(core: EngineCore) -> None:
    """`--seed` seeds the generator unseeded requests draw from, in arrival order."""
    prompts = mixed_prompts(core, 3, seed=4)
    unseeded = parse_sampling_params(
        {"do_sample": True, "temperature": 1.2, "max_new_tokens": 12, "ignore_eos": True}
    )

    def run(seed: int) -> list[list[int]]:
        args = replace(core.args, seed=seed)
        fresh = EngineCore(core.runner, core.tokenizer, args)
        return run_requests(fresh, prompts, [unseeded] * 3, arrival_steps=[0, 1, 2])

    first = run(5)
    assert run(5) == first
    assert run(6) != first
    assert len({tuple(t) for t in first}) == 3  # the requests drew different seeds


def test_abort_mid_prefill_and_mid_decode_frees_everything(core: EngineCore) -> None:
    prompts = mixed_prompts(core, 10, seed=3)
    params = [SamplingParams(max_new_tokens=40, ignore_eos=True) for _ in prompts]
    reqs = [
        core.new_request(2000 + i, p, sp, score=False)
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
    ]
    for r in reqs:
        core.submit(r)
    core.step()  # some requests are mid-prefill (chunked at 256 tokens per step)
    assert core.scheduler.allocator.num_used > 0
    core.abort(reqs[0])
    core.abort(reqs[1])
    for _ in range(6):
        core.step()
    for r in reqs[2:6]:  # mid-decode
        core.abort(r)
    core.abort(reqs[9])  # maybe still waiting
    for _ in range(200):
        core.step()
        if all(r.done or r.seqs[0].aborted for r in reqs):
            break
    core.step()
    assert core.scheduler.allocator.num_used == 0
    load = core.load_figures
    assert (load.current_load, load.dynamic_max_load, load.logical_max_load) == (0.0, 0.0, 0.0)


def test_n_sequences_and_stop_strings(core: EngineCore) -> None:
    prompt = core.tokenizer.encode("Count with me: one, two, three,")
    p = parse_sampling_params(
        {"n": 3, "best_of": 3, "do_sample": True, "seed": 7, "max_new_tokens": 8}
    )
    req = core.new_request(3000, prompt, p, score=False)
    core.submit(req)
    per_seq: dict[int, list[int]] = {0: [], 1: [], 2: []}
    while not req.done:
        for _, ev in core.step():
            assert isinstance(ev, TokenEvent)
            per_seq[ev.seq_index].append(ev.token_id)
    assert all(len(v) == 8 for v in per_seq.values())
    assert len({tuple(v) for v in per_seq.values()}) > 1  # independent samples
    greedy = run_requests(core, [prompt], [SamplingParams(max_new_tokens=20)])[0]
    text = core.tokenizer.decode(greedy)
    stop = text.strip().split()[1]
    sp = parse_sampling_params({"max_new_tokens": 20, "stop_sequences": [stop]})
    req = core.new_request(3001, prompt, sp, score=False)
    core.submit(req)
    events: list[TokenEvent] = []
    while not req.done:
        events += [ev for _, ev in core.step() if isinstance(ev, TokenEvent)]
    assert events[-1].finish_reason == "stop"
    out = "".join(e.text for e in events)
    assert out.endswith(stop) and out.count(stop) == 1


async def test_async_engine_generate_and_cancel(default_model_dir: object) -> None:
    engine = AsyncEngine(EngineArgs(max_total_token_num=4096))
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        assert engine.tokenizer is not None
        ids = engine.tokenizer.encode("What is AI?")
        got: list[TokenEvent] = []
        async with engine.generate(
            ids, SamplingParams(max_new_tokens=5, ignore_eos=True)
        ) as events:
            async for ev in events:
                assert isinstance(ev, TokenEvent)
                got.append(ev)
        assert [e.count_output_tokens for e in got] == [1, 2, 3, 4, 5] and got[
            -1
        ].finish_reason == "length"
        with trio.move_on_after(0.5):  # cancelled mid-decode: the request is aborted
            async with engine.generate(
                ids, SamplingParams(max_new_tokens=4000, ignore_eos=True)
            ) as events:
                async for _ in events:
                    pass
        with trio.fail_after(2):
            while engine.load().current_load != 0.0:  # noqa: ASYNC110 - polling a figure, no event
                await trio.sleep(0.01)
        assert not isinstance(got[0], ScoreEvent)
        nursery.cancel_scope.cancel()


def test_deliver_to_a_client_that_left_mid_step() -> None:
    """A step's events for a request whose receiver closed (the client left) are dropped, not fatal."""
    engine = AsyncEngine(EngineArgs(max_total_token_num=64))
    left, stays = (Request(i, [1], SamplingParams()) for i in (1, 2))
    send_left, recv_left = trio.open_memory_channel[object](8)
    send_stays, recv_stays = trio.open_memory_channel[object](8)
    engine._channels.update({1: send_left, 2: send_stays})  # type: ignore[dict-item]
    recv_left.close()
    ev = ScoreEvent(0.5, 1)
    engine._deliver([(left, ev), (stays, ev)])
    assert 1 not in engine._channels and recv_stays.receive_nowait() is ev
