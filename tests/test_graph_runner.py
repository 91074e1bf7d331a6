"""GraphRunner buckets and padding (CPU: eager replay of the static buffers) and decode attention."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
import torch

from runtime.kernels.triton import decode_attention as ta
from runtime.model.attention import build_attn_meta, paged_attention
from runtime.model.backends import Backends
from runtime.model.batch import ForwardBatch, SeqChunk, make_forward_batch
from runtime.model.config import ModelConfig
from runtime.model.graphs import GraphRunner, capture_buckets, length_buckets, pick_bucket
from runtime.model.kv_pool import KVPool
from runtime.model.llama import CausalLM

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
SEQ_SPAN = 64  # slots reserved per sequence: sequence i owns slots [i*64, (i+1)*64)
SENTINEL = 7.0  # the pool starts filled with this, so untouched slots are easy to see


def tiny_model(device: str = "cpu", dtype: torch.dtype = torch.float32) -> CausalLM:
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalLM(ModelConfig.from_hf_dict(TINY), dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layernorm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    return model.eval()


def make_pool(model: CausalLM, n_seqs: int, device: str = "cpu") -> KVPool:
    pool = KVPool(model.config, n_seqs * SEQ_SPAN, model.dtype, device)
    pool.k.fill_(SENTINEL)
    pool.v.fill_(SENTINEL)
    return pool


def clone_pool(pool: KVPool) -> KVPool:
    twin = KVPool.__new__(KVPool)
    twin.__dict__.update(pool.__dict__)
    twin.k, twin.v = pool.k.clone(), pool.v.clone()
    return twin


def prefill(model: CausalLM, pool: KVPool, prompts: list[list[int]], device: str = "cpu") -> None:
    chunks = [
        SeqChunk(p, 0, list(range(i * SEQ_SPAN, (i + 1) * SEQ_SPAN))) for i, p in enumerate(prompts)
    ]
    model.hidden(make_forward_batch(chunks, pool.pad_slot, device), pool)


def decode_batch(
    tokens: list[int], lens: list[int], pool: KVPool, device: str = "cpu"
) -> ForwardBatch:
    """One new token per sequence; sequence i has lens[i] tokens cached."""
    chunks = [
        SeqChunk([t], n, list(range(i * SEQ_SPAN, (i + 1) * SEQ_SPAN)))
        for i, (t, n) in enumerate(zip(tokens, lens, strict=True))
    ]
    return make_forward_batch(chunks, pool.pad_slot, device)


# ---- buckets --------------------------------------------------------------------------------
def test_default_buckets_match_lightllm() -> None:
    b = capture_buckets()
    assert b[:32] == list(range(1, 33))
    assert b[32:] == list(range(48, 257, 16))
    assert len(b) == 46 and b[-1] == 256


def test_custom_buckets_always_include_the_maximum() -> None:
    assert capture_buckets(100, 8, 24) == [*range(1, 9), 32, 56, 80, 100]
    assert capture_buckets(20) == list(range(1, 21))
    assert capture_buckets(48) == [*range(1, 33), 48]
    assert capture_buckets(50) == [*range(1, 33), 48, 50]
    assert capture_buckets(1) == [1]
    with pytest.raises(ValueError):
        capture_buckets(0)


def test_length_buckets() -> None:
    assert length_buckets(8192) == [256, 1024, 4096, 8192]
    assert length_buckets(4096) == [256, 1024, 4096]
    assert length_buckets(100) == [100]
    assert length_buckets(1000, first=64, factor=2) == [64, 128, 256, 512, 1000]


def test_pick_bucket_bisects() -> None:
    b = capture_buckets()
    assert pick_bucket(b, 1) == 1
    assert pick_bucket(b, 32) == 32
    assert pick_bucket(b, 33) == 48
    assert pick_bucket(b, 48) == 48
    assert pick_bucket(b, 241) == 256
    assert pick_bucket(b, 257) is None


def test_runner_buckets_and_keys() -> None:
    model = tiny_model()
    pool = make_pool(model, 1)
    r = GraphRunner(model, pool, 48, 64, split=2, step=8, len_buckets=[16, 100])
    assert r.batch_buckets == [1, 2, 10, 18, 26, 34, 42, 48]
    assert r.len_buckets == [16, 64]  # above the maximum dropped, the maximum added
    keys = r.keys()
    assert keys[0] == (48, 64) and len(keys) == 16
    sizes = [b * n for b, n in keys]
    assert sizes == sorted(sizes, reverse=True)


# ---- padding equivalence ------------------------------------------------------------------
@pytest.mark.parametrize("n_seqs", [1, 3, 17, 33, 40])
def test_padded_replay_matches_eager(n_seqs: int) -> None:
    model = tiny_model()
    gen = torch.Generator().manual_seed(n_seqs)
    plens = [5] if n_seqs == 1 else torch.randint(3, 40, (n_seqs,), generator=gen).tolist()
    prompts = [torch.randint(1, 256, (n,), generator=gen).tolist() for n in plens]
    pool_eager = make_pool(model, n_seqs)
    prefill(model, pool_eager, prompts)
    pool_graph = clone_pool(pool_eager)
    runner = GraphRunner(model, pool_graph, 48, 64, split=2, step=8, len_buckets=[16])
    runner.capture()
    lens = list(plens)
    for step in range(3):
        tokens = torch.randint(1, 256, (n_seqs,), generator=gen).tolist()
        batch = decode_batch(tokens, lens, pool_eager)
        assert runner.can_run(batch)
        bs, n = runner.bucket_for(batch) or (0, 0)
        assert bs >= n_seqs and n >= max(lens) + 1
        before = pool_graph.k.clone()
        want = model.hidden(batch, pool_eager)  # [B, H] unpadded
        got = runner.run(batch)  # [B, H] padded to the bucket
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        real = set(batch.out_slots.tolist())
        changed = (pool_graph.k != before).flatten(2).any(-1).any(0)  # [slots]
        written = set(torch.nonzero(changed).flatten().tolist())
        assert written - real <= {pool_graph.pad_slot}, f"step {step}: stray writes"
        if step == 0:  # the first padded step writes the pad slot; an exact bucket does not
            assert (pool_graph.pad_slot in written) == (bs > n_seqs)
        live = torch.ones(pool_graph.k.shape[1], dtype=torch.bool)
        live[pool_graph.pad_slot] = False
        torch.testing.assert_close(
            pool_graph.k[:, live], pool_eager.k[:, live], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            pool_graph.v[:, live], pool_eager.v[:, live], atol=1e-5, rtol=1e-5
        )
        lens = [x + 1 for x in lens]
    unused = torch.ones(pool_graph.k.shape[1], dtype=torch.bool)
    for i, n in enumerate(lens):
        unused[i * SEQ_SPAN : i * SEQ_SPAN + n] = False
    unused[pool_graph.pad_slot] = False
    assert bool((pool_graph.k[:, unused] == SENTINEL).all()), "a slot outside every table changed"
    assert runner.graph_replays == 3 and runner.eager_fallbacks == 0


def test_logits_index_subset_and_copy_out() -> None:
    model = tiny_model()
    pool = make_pool(model, 4)
    prefill(model, pool, [[1, 2, 3]] * 4)
    runner = GraphRunner(model, clone_pool(pool), 8, 32)
    runner.capture()
    batch = decode_batch([4, 5, 6, 7], [3] * 4, pool)
    batch.logits_index = torch.tensor([2, 0])
    want = model.hidden(batch, clone_pool(pool))
    got = runner.run(batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.data_ptr() != runner._ids.data_ptr()


# ---- fallbacks -------------------------------------------------------------------------------
def test_fallbacks_run_eagerly() -> None:
    model = tiny_model()
    pool = make_pool(model, 40)
    prefill(model, pool, [[3, 4, 5]] * 40)
    runner = GraphRunner(model, clone_pool(pool), 16, 32, len_buckets=[8])
    assert not runner.can_run(decode_batch([1], [3], pool))  # not captured yet
    runner.capture()
    assert runner.can_run(decode_batch([1] * 16, [3] * 16, pool))
    too_many = decode_batch([1] * 17, [3] * 17, pool)
    assert not runner.can_run(too_many)
    too_long = decode_batch([1], [40], pool)  # table width 41 > 32
    assert not runner.can_run(too_long)
    pre = make_forward_batch([SeqChunk([1, 2], 0, list(range(SEQ_SPAN)))], pool.pad_slot)
    assert not runner.can_run(pre)
    mixed = make_forward_batch(
        [SeqChunk([9], 3, list(range(SEQ_SPAN))), SeqChunk([1, 2], 0, list(range(64, 128)))],
        pool.pad_slot,
    )
    assert not runner.can_run(mixed)
    for batch in (too_many, mixed):
        want = model.hidden(batch, clone_pool(pool))
        torch.testing.assert_close(runner.run(batch), want, atol=1e-5, rtol=1e-5)
    assert runner.eager_fallbacks == 2 and runner.graph_replays == 0
    off = GraphRunner(model, pool, 16, 32, enabled=False)
    off.capture()
    assert not off.can_run(decode_batch([1], [3], pool))


# ---- decode attention ------------------------------------------------------------------------
def attention_case(
    b: int, nh: int, nkv: int, hd: int, length: int, dtype: torch.dtype, device: str = "cpu"
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(b * 100 + length)
    slots = b * length + 1
    k = torch.randn(slots, nkv, hd, generator=gen).to(dtype)
    v = torch.randn(slots, nkv, hd, generator=gen).to(dtype)
    q = torch.randn(b, nh, hd, generator=gen).to(dtype)
    table = torch.randperm(slots - 1, generator=gen)[: b * length].view(b, length)
    lens = torch.randint(1, length + 1, (b,), generator=gen)
    lens[0] = length
    for i in range(b):  # beyond seq_len: the pad slot, as make_forward_batch lays it out
        table[i, int(lens[i]) :] = slots - 1
    return tuple(t.to(device) for t in (q, k, v, table, lens))


@pytest.mark.parametrize(("nh", "nkv", "hd"), [(9, 3, 64), (8, 8, 32), (8, 2, 128)])
def test_reference_matches_model_decode_attention(nh: int, nkv: int, hd: int) -> None:
    q, k, v, table, lens = attention_case(5, nh, nkv, hd, 37, torch.float32)
    batch = ForwardBatch(lens, lens, lens, table, lens, [1] * 5, torch.arange(5))
    want = paged_attention(q, k, v, build_attn_meta(batch))  # [B, nh*hd]
    got = ta.decode_attention_ref(q, k, v, table, lens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_reference_skips_pad_and_zeroes_empty_rows() -> None:
    q, k, v, table, lens = attention_case(3, 4, 2, 16, 10, torch.float32)
    pad = k.shape[0] - 1
    table[2] = pad
    lens[2] = 1
    out = ta.decode_attention_ref(q, k, v, table, lens)
    assert bool((out[2] == 0).all())
    k2 = k.clone()
    k2[pad] = 1e4  # the pad slot's contents never matter
    torch.testing.assert_close(ta.decode_attention_ref(q, k2, v, table, lens), out)


@pytest.fixture
def triton_device(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """'cuda' on a GPU; 'cpu' under Triton's interpreter; skip when neither is possible."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs CUDA and triton (or triton alone for its CPU interpreter)")
    if torch.cuda.is_available():
        yield "cuda"
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ta._kernels.cache_clear()  # the kernels are defined in interpreter mode from here on
    yield "cpu"
    ta._kernels.cache_clear()


@pytest.mark.parametrize(
    ("b", "nh", "nkv", "hd", "length", "dtype"),
    [
        (3, 9, 3, 64, 200, torch.float32),
        (2, 8, 2, 128, 70, torch.float16),
        (4, 4, 4, 16, 3, torch.float32),
        (2, 6, 2, 10, 50, torch.float32),  # head_dim not a power of two
    ],
)
def test_triton_kernel_matches_reference(
    triton_device: str, b: int, nh: int, nkv: int, hd: int, length: int, dtype: torch.dtype
) -> None:
    device = triton_device
    q, k, v, table, lens = attention_case(b, nh, nkv, hd, length, dtype, device)
    table[-1] = k.shape[0] - 1  # a padding row: all pad slots, seq_len 1
    lens[-1] = 1
    got = ta.decode_attention(q, k, v, table, lens)
    want = ta.decode_attention_ref(q, k, v, table, lens)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_triton_in_model_matches_torch(triton_device: str) -> None:
    device = triton_device
    model = tiny_model(device)
    pool = make_pool(model, 3, device)
    prefill(model, pool, [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]], device)
    batch = decode_batch([13, 14, 15], [4, 2, 6], pool, device)
    want = model.hidden(batch, clone_pool(pool))
    model.use_backends(Backends("triton", decode_attention=ta.decode_attention))
    got = model.hidden(batch, clone_pool(pool))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ---- real CUDA graphs (GPU machines only) ----------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_matches_eager() -> None:
    model = tiny_model("cuda")
    pool = make_pool(model, 20, "cuda")
    prompts = [[i + 1] * (3 + i) for i in range(20)]
    prefill(model, pool, prompts, "cuda")
    runner = GraphRunner(model, clone_pool(pool), 24, 64, device="cuda", split=4, step=8)
    runner.capture()
    assert runner.graphs and runner.use_graphs
    for n in (1, 3, 5, 20):
        lens = [len(p) for p in prompts[:n]]
        batch = decode_batch(list(range(1, n + 1)), lens, pool, "cuda")
        want = model.hidden(batch, clone_pool(pool))
        got = runner.run(batch)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
