"""The model runner: turns a `StepPlan` into one `ForwardBatch` and runs the model on it."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cuda import reward_head
from runtime import cpu_linear
from runtime.batch import SeqChunk, make_forward_batch
from runtime.config import CheckpointError
from runtime.engine_api import ModelInfo
from runtime.engine_args import EngineArgs
from runtime.graph_runner import GraphRunner
from runtime.kv_pool import KVPool
from runtime.model import CausalLM, ForwardBatch
from runtime.scheduler import SchedulerConfig, StepPlan
from runtime.tokenizer import Tokenizer
from runtime.weights import load_model, resolve_dtype

log = logging.getLogger("nurserve.runner")


@dataclass
class ModelRunner:
    """Owns the model, the KV pool and the device; the engine hands it one plan per step."""

    model: CausalLM
    pool: KVPool
    device: torch.device
    max_req_total_len: int
    batch_max_tokens: int
    eos_ids: list[int]
    generation_defaults: dict[str, object]
    graphs: GraphRunner | None = None

    @property
    def is_reward_model(self) -> bool:
        return self.model.config.is_reward_model

    def prepare(self, plan: StepPlan) -> ForwardBatch:
        """The plan's chunks as flat tensors (decode chunks first, as the scheduler orders them)."""
        chunks = [
            SeqChunk(c.seq.all_ids[c.start : c.start + c.length], c.start, c.seq.slots, c.sample)
            for c in plan.chunks
        ]
        return make_forward_batch(chunks, self.pool.pad_slot, self.device)

    def run(self, batch: ForwardBatch) -> Tensor:
        """Final-normed hidden rows `[B', H]` of the chunks that sample (reward models: `[B']` scores)."""
        if self.is_reward_model:  # prefill only: the reward-head kernel reads the rows in place
            return reward_head.score_batch(self.model, batch, self.pool)
        if self.graphs is not None and self.graphs.can_run(batch):
            return self.graphs.run(batch)
        return self.model.hidden(batch, self.pool)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.model.logits_from_hidden(hidden)  # [B', V] fp32

    def scheduler_config(self, args: EngineArgs) -> SchedulerConfig:
        return SchedulerConfig(
            capacity_tokens=self.pool.capacity_tokens,
            batch_max_tokens=self.batch_max_tokens,
            running_max_req_size=args.running_max_req_size,
            router_token_ratio=args.router_token_ratio,
            router_max_new_token_len=args.router_max_new_token_len,
        )

    def model_info(self, args: EngineArgs, eos_ids: list[int]) -> ModelInfo:
        return ModelInfo(
            model_name=args.model_name,
            vocab_size=self.model.config.vocab_size,
            max_req_total_len=self.max_req_total_len,
            eos_ids=list(eos_ids),
            is_reward_model=self.is_reward_model,
            generation_defaults=dict(self.generation_defaults),
        )


def resolve_model_dir(model_dir: str | None) -> Path:
    """The checkpoint folder: the embedded default, an HF folder, or a GGUF file (converted once)."""
    from runtime import default_model

    if model_dir is None:
        return default_model.default_model_dir()
    path = Path(model_dir)
    if path.suffix == ".gguf":
        return default_model.converted_gguf_dir(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder or GGUF file")
    return path


def _kv_capacity(
    args: EngineArgs, model: CausalLM, dtype: torch.dtype, device: torch.device
) -> int:
    if args.max_total_token_num is not None:
        return args.max_total_token_num
    per_token = KVPool.bytes_per_token(model.config, dtype)
    if device.type == "cuda":
        free_bytes, total_bytes = torch.cuda.mem_get_info(device)
        budget = free_bytes - total_bytes * (1 - args.mem_fraction)
    else:
        budget = args.cpu_kv_cache_bytes
    capacity = int(budget // per_token)
    if capacity < 64:
        raise MemoryError(
            f"only {int(budget)} bytes left for the KV cache ({capacity} tokens at {per_token} B/token): "
            "lower --mem_fraction's reserve, use a smaller --data_type, or set --max_total_token_num"
        )
    return capacity


def load_runner(args: EngineArgs) -> tuple[ModelRunner, Tokenizer]:
    """Load weights, tokenizer and KV pool as `args` say."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and args.num_threads:
        torch.set_num_threads(args.num_threads)
    dtype = resolve_dtype(args.data_type, device)
    # fp16 on a CPU: fp16-stored weights with fp32 activations, K/V and sums (fbgemm); CPUs
    # without native fp16 arithmetic run a whole-fp16 model many times slower than fp32
    fp16_weights = (
        device.type == "cpu" and dtype == torch.float16 and cpu_linear.fp16_weights_available()
    )
    if fp16_weights:
        dtype = torch.float32
    folder = resolve_model_dir(args.model_dir)
    model = load_model(folder, dtype, device)
    if device.type == "cpu":
        weights = "fp16" if fp16_weights else "fp32"
        packed = cpu_linear.pack_model(model, weights)
        log.info("packed %d weight matrices (%s weights)", packed, weights)
    tokenizer = Tokenizer.from_dir(folder)
    cfg = model.config
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"{folder}: tokenizer has {tokenizer.vocab_size} tokens but the embedding only {cfg.vocab_size}"
        )
    capacity = _kv_capacity(args, model, dtype, device)
    pool = KVPool(cfg, capacity, dtype, device)
    max_len = args.max_req_total_len or cfg.max_position_embeddings
    max_len = min(max_len, capacity)
    default_batch_tokens = 8192 if device.type == "cuda" else 512
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    eos = gen.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or cfg.eos_token_ids)
    defaults = {
        k: gen[k]
        for k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
        if k in gen
    }
    log.info("loaded %s (%s, %s) with %d KV slots", folder, cfg.architecture, dtype, capacity)
    runner = ModelRunner(
        model=model,
        pool=pool,
        device=device,
        max_req_total_len=max_len,
        batch_max_tokens=args.batch_max_tokens or default_batch_tokens,
        eos_ids=eos_ids,
        generation_defaults=defaults,
    )
    if os.environ.get("NURSERVE_NO_WARMUP") is None:
        warmup(runner)
    if device.type == "cuda" and not args.disable_cudagraph:
        runner.graphs = GraphRunner(
            model,
            pool,
            min(args.graph_max_batch_size, args.running_max_req_size),
            min(args.graph_max_len_in_batch or max_len, max_len),
            enabled=True,
            device=device,
        )
        runner.graphs.capture()
    return runner, tokenizer


def warmup(runner: ModelRunner) -> None:
    """A tiny prefill and a tiny decode step, so the first request pays for no lazy
    initialisation (oneDNN primitives, and on the CPU the Numba decode kernel, which is compiled
    or loaded from Numba's cache on first use: seconds). Writes only the inert pad slot."""
    pool = runner.pool
    pad = pool.pad_slot
    prefill = make_forward_batch([SeqChunk([0, 0], 0, [pad, pad])], pad, runner.device)
    decode = make_forward_batch(
        [SeqChunk([0], 1, [pad, pad]), SeqChunk([0], 1, [pad, pad])], pad, runner.device
    )
    for batch in (prefill, decode):
        hidden = runner.model.hidden(batch, pool)  # [B, H]
        if not runner.is_reward_model:
            runner.model.logits_from_hidden(hidden)
