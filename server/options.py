"""The table of settings: each has a LightLLM-style flag (`--max_total_token_num`) and an
environment variable (`NURSERVE_MAX_TOTAL_TOKEN_NUM`); `server.settings` reads them."""

from __future__ import annotations

from dataclasses import dataclass

ENV_PREFIX = "NURSERVE_"


@dataclass(frozen=True)
class Option:
    """One setting: its flag is `--{name}`, its environment variable `NURSERVE_{NAME}`."""

    name: str
    kind: str  # "str" | "int" | "float" | "bool" | "int_list"
    help: str
    engine: bool = False  # forwarded to EngineArgs
    choices: tuple[str, ...] | None = None
    secret: bool = False  # never shown in --help or logs (API keys)

    @property
    def env(self) -> str:
        """The environment variable of this option."""
        return ENV_PREFIX + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    # --- model and engine (LightLLM flag names) ---
    Option(
        "model_dir",
        "str",
        "HF model folder (config.json + safetensors) or a .gguf file; "
        "unset = the embedded default model (SmolLM2-135M)",
        engine=True,
    ),
    Option("model_name", "str", "name answered by /get_model_name", engine=True),
    Option(
        "tokenizer_mode",
        "str",
        "tokenizer mode (LightLLM compatibility)",
        engine=True,
        choices=("fast", "slow", "auto"),
    ),
    Option(
        "data_type",
        "str",
        "weight/activation dtype of dense weights; unset = bf16 on a GPU, fp16 on the CPU, which "
        "there means fp16-stored weights with fp32 arithmetic (half fp32's weight memory, ~1.9x "
        "its batch-1 decode; fp32 is the exact dequantized model)",
        engine=True,
        choices=("fp32", "bf16", "fp16"),
    ),
    Option(
        "max_total_token_num",
        "int",
        "KV-cache capacity in tokens; unset = profiled from free memory and --mem_fraction",
        engine=True,
    ),
    Option(
        "mem_fraction",
        "float",
        "fraction of device memory the process may use when profiling the KV capacity",
        engine=True,
    ),
    Option("batch_max_tokens", "int", "most prompt tokens prefilled in one step", engine=True),
    Option("running_max_req_size", "int", "most requests running at once", engine=True),
    Option(
        "max_req_total_len",
        "int",
        "limit on prompt + max_new_tokens of one request; longer requests get 400",
        engine=True,
    ),
    Option(
        "max_waiting_reqs",
        "int",
        "bounded waiting queue: requests beyond it get 503 + Retry-After",
        engine=True,
    ),
    Option(
        "eos_id",
        "int_list",
        "end-of-sequence token ids (flag: --eos_id 2 7; env: "
        "comma-separated); unset = from the model config",
        engine=True,
    ),
    Option("disable_cudagraph", "bool", "run decode eagerly (no CUDA graphs)", engine=True),
    Option(
        "disable_dynamic_prompt_cache",
        "bool",
        "do not reuse the KV of cached prompt prefixes (the radix-tree prefix cache is on by default)",
        engine=True,
    ),
    Option(
        "graph_max_batch_size", "int", "largest decode batch captured in a CUDA graph", engine=True
    ),
    Option(
        "graph_max_len_in_batch",
        "int",
        "longest sequence a captured graph serves; unset = max_req_total_len",
        engine=True,
    ),
    Option(
        "device", "str", "torch device (cuda, cuda:1, cpu); unset = cuda if available", engine=True
    ),
    Option("seed", "int", "seed of the engine's default random generator", engine=True),
    Option(
        "router_token_ratio",
        "float",
        "KV use above which the admission estimate turns conservative",
        engine=True,
    ),
    Option(
        "router_max_new_token_len",
        "int",
        "expected output length for the optimistic admission estimate",
        engine=True,
    ),
    Option(
        "cpu_kv_cache_bytes",
        "int",
        "KV-cache budget on the CPU when --max_total_token_num is unset",
        engine=True,
    ),
    Option("num_threads", "int", "torch intra-op threads on the CPU", engine=True),
    Option(
        "tp",
        "int",
        "tensor parallelism: N processes (this one is rank 0, N-1 workers are spawned) in one "
        "torch.distributed group, NCCL on GPUs and gloo on the CPU; each holds 1/N of the "
        "heads (split by KV-head group, so N <= the KV heads), MLP, vocabulary and KV cache; "
        "dense weights only; a worker's death ends the server (status 3)",
        engine=True,
    ),
    # --- backends, chosen once when the model loads ---
    Option(
        "quant_type",
        "str",
        "CPU weight format: auto (the default) keeps a GGUF's own block formats (the default "
        "model's Q4_1 as shipped, 0.98x the file's bytes; dense for HF checkpoints, reward models, "
        "GPUs and --tp > 1); none = dense --data_type weights; a format name quantizes an HF "
        "checkpoint at load",
        engine=True,
        choices=("auto", "none", "q4_0", "q4_1", "q8_0", "q4_k", "q6_k"),
    ),
    Option(
        "quant_mode",
        "str",
        "arithmetic of quantized weights: int16 (the default: activations rounded to 16 bits "
        "per 32-block, integer multiply-adds on the GGUF blocks as shipped), exact (fp32 "
        "activations: the dequantized model to fp32 rounding) or fast (8 bits, as llama.cpp)",
        engine=True,
        choices=("exact", "int16", "fast"),
    ),
    Option(
        "cpu_linear",
        "str",
        "fp32 CPU projections: onednn packs each weight once into oneDNN's layout; aten "
        "leaves F.linear",
        engine=True,
        choices=("onednn", "aten"),
    ),
    Option(
        "cpu_attention",
        "str",
        "CPU decode attention: numba reads K/V through the slot table; torch gathers + SDPA",
        engine=True,
        choices=("numba", "torch"),
    ),
    Option(
        "cpu_kernels",
        "str",
        "CPU RMSNorm, rotary + K/V store, SiLU*up and greedy sampling: numba one-pass kernels, or torch ops",
        engine=True,
        choices=("numba", "torch"),
    ),
    Option(
        "cpu_decode",
        "str",
        "CPU decode steps of int16-mode weights: fused runs the whole decoder stack in one "
        "Numba call (the same bits as layers, about twice as fast at batch 1); layers calls "
        "each layer's kernels from Python",
        engine=True,
        choices=("fused", "layers"),
    ),
    Option(
        "gpu_attention",
        "str",
        "GPU decode attention: triton split-K kernel, or torch gather + SDPA",
        engine=True,
        choices=("triton", "torch"),
    ),
    Option(
        "reward_kernel",
        "str",
        "reward head on a GPU: the cupy kernel, or its torch twin",
        engine=True,
        choices=("cupy", "torch"),
    ),
    Option(
        "no_warmup",
        "bool",
        "skip the warm-up forward at start-up (the first request then pays for kernel loading)",
        engine=True,
    ),
    Option(
        "fault_inject_step",
        "int",
        "tests: make the engine fail at this step (exercises the death path)",
        engine=True,
    ),
    # --- HTTP server (ours) ---
    Option("host", "str", "address to bind [launcher]"),
    Option("port", "int", "port to bind [launcher]"),
    Option(
        "backlog",
        "int",
        "listen backlog; Hypercorn's default 100 drops connections in bursts [launcher]",
    ),
    Option("max_body_bytes", "int", "largest request body; larger bodies get 413"),
    Option(
        "shutdown_grace_s",
        "float",
        "on SIGTERM, how long in-flight requests may run before they are cut [launcher]",
    ),
    Option(
        "stall_timeout_s",
        "float",
        "/health answers 503 when requests are in flight and none made progress for this long",
    ),
    Option(
        "death_exit_delay_s",
        "float",
        "after the engine dies, how long the 503s may go "
        "out before the process exits with status 3",
    ),
    Option(
        "keep_alive_s",
        "float",
        "idle keep-alive timeout of client connections [launcher]",
    ),
    Option(
        "startup_timeout_s",
        "float",
        "how long model loading may take before Hypercorn gives up [launcher]",
    ),
    Option("log_level", "str", "log level", choices=("debug", "info", "warning", "error")),
    Option("access_log", "bool", "log every request (costs CPU under load) [launcher]"),
    # --- reliability and access control ---
    Option(
        "body_timeout_s",
        "float",
        "longest wait for a request body (408 past it); a body the route does not read is "
        "drained this long before the answer, else the connection closes after it",
    ),
    Option(
        "stream_buffer_events",
        "int",
        "events a stream may hold for a client that stops reading; past it the request is "
        "aborted (its KV freed) and the stream ends with an error event",
    ),
    Option(
        "stream_pause_bytes",
        "int",
        "a stream whose client has this many bytes sent but unread (from its TCP window) sits "
        "out of the decode batch, KV kept, until it reads; 0 = off",
    ),
    Option(
        "stream_stall_s",
        "float",
        "a stream whose client read nothing for this long is aborted (its KV freed)",
    ),
    Option(
        "socket_send_buffer_bytes",
        "int",
        "SO_SNDBUF of client connections (0 = the kernel's autotuning), so that a client that "
        "stops reading is seen within a few KB [launcher]",
    ),
    Option(
        "api_key",
        "str",
        "require `Authorization: Bearer <key>` on every route but the health probes "
        "(env: comma-separated for several keys)",
        secret=True,
    ),
    Option("api_key_file", "str", "file of API keys, one per line (added to --api_key)"),
    Option("protect_metrics", "bool", "/metrics also needs the API key"),
)
OPTIONS_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
