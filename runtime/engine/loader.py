"""Build the engine's model runner from `EngineArgs`: checkpoint, weights and backends, tokenizer,
EOS ids and sampling defaults, KV pool, warm-up, CUDA graphs."""

from __future__ import annotations

import json
import logging
import os
from functools import partial
from pathlib import Path

import torch

from runtime.engine.args import EngineArgs
from runtime.kernels.cpu import linear as cpu_linear
from runtime.loading.default_model import GGUF_COPY
from runtime.loading.gguf_weights import build_quantized, quantize_dense, read_weights
from runtime.loading.hf_folder import load_model, resolve_dtype
from runtime.model.assemble import assemble
from runtime.model.backends import BackendSettings, select_backends
from runtime.model.batch import SeqChunk, make_forward_batch
from runtime.model.config import CheckpointError, ModelConfig
from runtime.model.graphs import GraphRunner
from runtime.model.kv_pool import KVPool
from runtime.model.llama import CausalLM
from runtime.model.memory import weight_bytes
from runtime.model.runner import ModelRunner
from runtime.parallel.launch import TPGroup, TPModelRunner, start_group
from runtime.text.tokenizer import Tokenizer

log = logging.getLogger("nurserve.runner")

# generation_config.json keys that become per-request sampling defaults
GENERATION_DEFAULT_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


def resolve_model_dir(model_dir: str | None) -> Path:
    """The checkpoint folder: the embedded default, an HF folder, or a GGUF file (converted once)."""
    from runtime.loading import default_model

    if model_dir is None:
        return default_model.default_model_dir()
    path = Path(model_dir)
    if path.suffix == ".gguf":
        return default_model.converted_gguf_dir(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder or GGUF file")
    return path


def resolve_generation(
    folder: Path, cfg: ModelConfig, tokenizer: Tokenizer, eos_override: list[int] | None
) -> tuple[list[int], dict[str, object]]:
    """The one place EOS ids and sampling defaults are decided: `--eos_id`, else
    generation_config.json's, else config.json's, else the tokenizer's eos token."""
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    eos = gen.get("eos_token_id")
    gen_eos = [eos] if isinstance(eos, int) else list(eos or [])
    eos_ids = list(eos_override or gen_eos or cfg.eos_token_ids or tokenizer.eos_ids)
    defaults = {k: gen[k] for k in GENERATION_DEFAULT_KEYS if k in gen}
    return eos_ids, defaults


def _kv_capacity(
    args: EngineArgs, config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> int:
    """KV slots: `--max_total_token_num`, else the memory budget over the bytes per token of
    `config` (a tensor-parallel rank's shard: its KV heads only)."""
    if args.max_total_token_num is not None:
        return args.max_total_token_num
    per_token = KVPool.bytes_per_token(config, dtype)
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


def backend_settings(args: EngineArgs) -> BackendSettings:
    return BackendSettings(
        cpu_linear=args.cpu_linear,
        cpu_attention=args.cpu_attention,
        cpu_kernels=args.cpu_kernels,
        gpu_attention=args.gpu_attention,
    )


def _quantized_model(args: EngineArgs, folder: Path, device: torch.device) -> CausalLM | None:
    """`--quant_type` on the CPU: a GGUF's own block formats (auto), or an HF checkpoint's
    weights quantized at load into the named format; None for a dense model."""
    quant = args.quant_type
    if device.type != "cpu" or quant == "none":
        return None
    cfg = ModelConfig.from_dir(folder)
    gguf = folder / GGUF_COPY
    if quant == "auto":
        if not gguf.is_file() or cfg.is_reward_model:
            return None
        model = build_quantized(cfg, read_weights(gguf, cfg), args.quant_mode)
    else:
        dense = load_model(folder, torch.float32, device)
        model = quantize_dense(dense, quant, args.quant_mode)
    model.use_backends(select_backends(device, torch.float32, backend_settings(args)))
    if args.cpu_decode == "fused" and model.fuse_decode():
        log.info("decode steps fused: the decoder stack in one Numba call")
    return model


def dense_format(args: EngineArgs, device: torch.device) -> tuple[torch.dtype, str]:
    """The model dtype and the packed-weight kind (`assemble`'s `weights`) of dense weights.

    fp16 on a CPU: fp16-stored weights with fp32 activations, K/V and sums (fbgemm); CPUs
    without native fp16 arithmetic run a whole-fp16 model many times slower than fp32."""
    dtype = resolve_dtype(args.data_type, device)
    if device.type == "cpu" and dtype == torch.float16 and cpu_linear.fp16_weights_available():
        return torch.float32, "fp16"
    return dtype, "fp32"


def load_model_for(args: EngineArgs, folder: Path, device: torch.device) -> CausalLM:
    """Load the weights and assemble the model's backends for `device` and `--data_type`."""
    rss0 = _rss_bytes()
    quantized = _quantized_model(args, folder, device)
    if quantized is not None:
        gguf = folder / GGUF_COPY
        file_bytes = gguf.stat().st_size if gguf.is_file() else 0
        held = weight_bytes(quantized)
        log.info(
            "weights %s (%s arithmetic): %.1f MB held%s; process RSS grew %.1f MB while loading",
            args.quant_type,
            args.quant_mode,
            held / 1e6,
            f", {held / file_bytes:.2f}x the GGUF file" if file_bytes else "",
            (_rss_bytes() - rss0) / 1e6,
        )
        return quantized
    dtype, weights = dense_format(args, device)
    model = load_model(folder, dtype, device)
    ops, packed = assemble(model, backend_settings(args), weights)
    log.info(
        "backends %s; packed %d weight matrices (%s weights): %.1f MB held",
        ops.name,
        packed,
        weights,
        weight_bytes(model) / 1e6,
    )
    return model


def _rss_bytes() -> int:
    """This process's resident set (Linux /proc; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _load_tp(
    args: EngineArgs, folder: Path, device: torch.device, threads: int | None
) -> tuple[CausalLM, TPGroup]:
    """`--tp N > 1`: rank 0's shard in this process, N-1 worker processes (runtime.parallel)."""
    dtype, weights = dense_format(args, device)
    return start_group(folder, args.tp, device, dtype, weights, backend_settings(args), threads)


def _threads(args: EngineArgs) -> int | None:
    """Intra-op threads per process: `--num_threads`, else at `--tp N` the cores split N ways."""
    if args.num_threads or args.tp == 1:
        return args.num_threads
    return max(1, (os.cpu_count() or 1) // args.tp)


def load_runner(args: EngineArgs) -> tuple[ModelRunner, Tokenizer]:
    """Load weights, tokenizer and KV pool as `args` say (at `--tp N`, rank 0's shard and the
    workers holding the others)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.tp > 1 and args.quant_type not in ("none", "auto") and device.type == "cpu":
        raise CheckpointError(  # auto (the default) means dense at --tp N > 1
            f"--tp {args.tp} needs dense weights: use --quant_type none, not {args.quant_type}"
        )
    threads = _threads(args)
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    folder = resolve_model_dir(args.model_dir)
    group: TPGroup | None = None
    if args.tp > 1:
        model, group = _load_tp(args, folder, device, threads)
    else:
        model = load_model_for(args, folder, device)
    try:
        return _build_runner(args, folder, model, device, group)
    except BaseException:
        if group is not None:
            group.close()
        raise


def _build_runner(
    args: EngineArgs,
    folder: Path,
    model: CausalLM,
    device: torch.device,
    group: TPGroup | None,
) -> tuple[ModelRunner, Tokenizer]:
    """Tokenizer check, KV pool, EOS ids, the runner, warm-up and CUDA graphs."""
    tokenizer = Tokenizer.from_dir(folder)
    cfg = model.config
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"{folder}: tokenizer has {tokenizer.vocab_size} tokens but the embedding only {cfg.vocab_size}"
        )
    kv_config = cfg if group is None else group.shard.local_config
    capacity = _kv_capacity(args, kv_config, model.dtype, device)
    pool = KVPool(kv_config, capacity, model.dtype, device)
    if group is not None:
        group.configure(capacity)
    max_len = min(args.max_req_total_len or cfg.max_position_embeddings, capacity)
    eos_ids, defaults = resolve_generation(folder, cfg, tokenizer, args.eos_id)
    log.info("loaded %s (%s, %s) with %d KV slots", folder, cfg.architecture, model.dtype, capacity)
    runner = (ModelRunner if group is None else partial(TPModelRunner, tp=group))(
        model=model,
        pool=pool,
        device=device,
        max_req_total_len=max_len,
        batch_max_tokens=args.batch_max_tokens or (8192 if device.type == "cuda" else 512),
        eos_ids=eos_ids,
        generation_defaults=defaults,
        reward_kernel=args.reward_kernel == "cupy",
    )
    if not args.no_warmup:
        warmup(runner)
    # captured graphs would replay rank 0's collectives only: --tp > 1 runs decode eagerly
    if device.type == "cuda" and not args.disable_cudagraph and group is None:
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
    initialisation (oneDNN primitives; on the CPU the Numba kernels, compiled or loaded from
    Numba's cache on first use: seconds). Writes only the inert pad slot."""
    pool = runner.pool
    pad = pool.pad_slot
    prefill = make_forward_batch([SeqChunk([0, 0], 0, [pad, pad])], pad, runner.device)
    decode = make_forward_batch(
        [SeqChunk([0], 1, [pad, pad]), SeqChunk([0], 1, [pad, pad])], pad, runner.device
    )
    for batch in (prefill, decode):
        if runner.is_reward_model:
            runner.score(batch)
        else:
            runner.logits(runner.run(batch))
