"""Engine settings: LightLLM's flag names for what we implement, plus ours."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineArgs:
    """Everything `AsyncEngine` needs; the CLI (`python -m server`) and env vars fill it."""

    model_dir: str | None = None  # None: the embedded default (SmolLM2-135M-Instruct)
    model_name: str = "default_model_name"
    tokenizer_mode: str = "fast"
    data_type: str | None = None  # fp32 | bf16 | fp16; default bf16 on a GPU, fp32 on the CPU
    device: str | None = None  # default: cuda when available, else cpu
    max_total_token_num: int | None = None  # KV capacity in tokens; None: from the memory budget
    mem_fraction: float = 0.9  # of free device memory after the weights (GPU)
    cpu_kv_cache_bytes: int = (
        2 * 1024**3
    )  # the KV budget on the CPU when max_total_token_num is unset
    batch_max_tokens: int | None = None  # tokens per step (prefill chunks + decodes)
    running_max_req_size: int = 256  # sequences in the running batch
    max_req_total_len: int | None = None  # prompt + max_new_tokens; default: the model's context
    max_waiting_reqs: int = 1024  # past this, new requests get 503 + Retry-After
    router_token_ratio: float = 0.9  # KV use above which the admission estimate turns conservative
    router_max_new_token_len: int = 1024  # expected output length for the optimistic estimate
    eos_id: list[int] | None = None
    disable_cudagraph: bool = False
    graph_max_batch_size: int = 256
    graph_max_len_in_batch: int | None = None
    num_threads: int | None = None  # torch intra-op threads on the CPU
    seed: int = 0  # seeds the generator that unseeded requests draw their seeds from
    quant_type: str = "auto"  # auto | none | q4_0 | q4_1 | q8_0 | q4_k | q6_k (CPU weights)
    quant_mode: str = "int16"  # exact: fp32 activations; int16 / fast: 16 / 8 bits per block
    cpu_linear: str = "onednn"  # onednn | aten
    cpu_attention: str = "numba"  # numba | torch
    cpu_kernels: str = "numba"  # numba | torch
    cpu_decode: str = "fused"  # fused | layers (int16-mode decode steps)
    gpu_attention: str = "triton"  # triton | torch
    reward_kernel: str = "cupy"  # cupy | torch
    no_warmup: bool = False
    disable_dynamic_prompt_cache: bool = False  # LightLLM's flag: no prefix cache
    tp: int = 1  # tensor parallelism: processes in the group (rank 0 is this one)
    fault_inject_step: int | None = None  # tests: raise inside the step loop at this step
