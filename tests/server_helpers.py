"""Start and stop a real server subprocess on a free port, and wait until it is ready; an httpx
client for it, a strict LightLLM SSE parser and the seed request body. For the in-process app
(conftest.py's `make_app`): the test engines' length limit and `serving`, its test client. Tiny
random-weight reward checkpoints (`make_tiny_reward_checkpoint`, `tiny_reward_score`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import httpx
import torch
from safetensors.torch import save_file

from runtime.loading.hf_folder import load_model
from runtime.model.batch import ForwardBatch, SeqChunk, make_forward_batch
from runtime.model.kv_pool import KVPool
from runtime.model.llama import CausalLM

if TYPE_CHECKING:
    from quart_trio import QuartTrio

REPO_ROOT = Path(__file__).resolve().parent.parent
SEED_BODY: dict[str, Any] = {
    "inputs": "What is AI?",
    "parameters": {"max_new_tokens": 17, "frequency_penalty": 1},
    "multimodal_params": {},
}
MAX_LEN = 512  # max_req_total_len of the in-process test engines (conftest.py's make_app)

# make_app(deaths=None, **engine_overrides) -> a QuartTrio app on a fresh engine
Factory = Callable[..., "QuartTrio"]


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def hypercorn_command() -> list[str]:
    """The `hypercorn` executable of this interpreter's environment."""
    script = Path(sys.executable).parent / "hypercorn"
    return [str(script)] if script.exists() else [sys.executable, "-m", "hypercorn"]


@dataclass
class ServerProcess:
    """A server subprocess; its stdout+stderr go to a log file."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    _log_file: IO[bytes] = field(repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        """Everything the server printed so far."""
        self._log_file.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send a signal to the server process."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        """Wait for the process to exit; returns its status."""
        return self.proc.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; closes the log. Returns the exit status."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            return self.proc.returncode
        finally:
            if not self._log_file.closed:
                self._log_file.close()
                if not os.environ.get("NURSERVE_KEEP_SERVER_LOGS"):
                    self.log_path.unlink(missing_ok=True)


def start_server(
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    launcher: str = "module",
    ready_timeout_s: float = 600.0,
) -> ServerProcess:
    """Start `python -m server` (launcher "module") or the hypercorn CLI ("hypercorn").

    Waits until `GET /health` answers 200; raises RuntimeError with the server's log when the
    process exits or the timeout passes first.
    """
    port = free_port()
    if launcher == "module":
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), *args]
    elif launcher == "hypercorn":
        cmd = [
            *hypercorn_command(),
            "--worker-class",
            "trio",
            "server.app:create_app()",
            "--bind",
            f"127.0.0.1:{port}",
            *args,
        ]
    else:
        raise ValueError(f"unknown launcher {launcher!r}")
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH", "")) if p
    )
    full_env.setdefault("OMP_NUM_THREADS", "2")
    full_env.update(env or {})
    log_fd, log_name = tempfile.mkstemp(prefix="nurserve-server-", suffix=".log")
    log_file = os.fdopen(log_fd, "wb")
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=full_env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    server = ServerProcess(proc, port, Path(log_name), log_file)
    try:
        wait_ready(server, ready_timeout_s)
    except BaseException:
        server.stop(timeout_s=5)
        raise
    return server


def wait_ready(server: ServerProcess, timeout_s: float) -> None:
    """Poll /health until 200."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with status {server.proc.returncode} before it was ready:\n"
                    + server.log_text()[-5000:]
                )
            try:
                if client.get(server.base_url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout_s} s:\n" + server.log_text()[-5000:])


def client_for(srv: ServerProcess, **kwargs: Any) -> httpx.AsyncClient:
    """An httpx client for `srv` with room for 200 concurrent connections."""
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    return httpx.AsyncClient(base_url=srv.base_url, timeout=120.0, limits=limits, **kwargs)


def parse_sse(raw: bytes) -> list[dict[str, Any]]:
    """Strict LightLLM framing: `data:{json}\\n\\n` frames only, no space, no [DONE]."""
    assert raw.endswith(b"\n\n"), raw[-100:]
    out = []
    for frame in raw.decode("utf-8").split("\n\n")[:-1]:
        assert frame.startswith("data:{"), frame
        out.append(json.loads(frame[5:]))
    return out


async def stream_through_sigterm(
    client: httpx.AsyncClient, srv: ServerProcess, body: dict[str, Any]
) -> list[dict[str, Any]]:
    """Stream `/generate_stream`, send `srv` SIGTERM on the first chunk, return the parsed events
    (a draining server finishes the stream)."""
    chunks: list[bytes] = []
    async with client.stream("POST", "/generate_stream", json=body) as r:
        async for chunk in r.aiter_raw():
            if not chunks:
                srv.signal(signal.SIGTERM)
            chunks.append(chunk)
    return parse_sse(b"".join(chunks))


@asynccontextmanager
async def serving(app: QuartTrio) -> AsyncIterator[Any]:
    """Run the app's startup/shutdown around a test client."""
    async with app.test_app() as test_app:
        yield test_app.test_client()


# ---- tiny reward checkpoints ------------------------------------------------------------------
# kind -> (architecture, layout); layout "hf" = Llama names, "internlm2" = packed wqkv
REWARD_KINDS: dict[str, tuple[str, str]] = {
    "llama_seq_cls": ("LlamaForSequenceClassification", "hf"),
    "mistral_seq_cls": ("MistralForSequenceClassification", "hf"),
    "qwen2_seq_cls": ("Qwen2ForSequenceClassification", "hf"),
    "internlm2_reward": ("InternLM2ForRewardModel", "internlm2"),
    "qwen2_reward": ("Qwen2ForRewardModel", "hf"),
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|reward|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
)


# ---- tiny checkpoints ------------------------------------------------------------------------
def _write_tokenizer(folder: Path) -> tuple[int, int | None, int | None]:
    """The default model's tokenizer if it is already converted, else a byte-level BPE.

    Returns (size with added tokens, id of `<|im_end|>`, id of `<|endoftext|>`).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from runtime.loading import default_model

    src = default_model.cache_root() / default_model.FOLDER_NAME
    if (src / ".complete").is_file() and (src / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (src / name).is_file():
                shutil.copy(src / name, folder / name)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    else:
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
        )
        tok.save(str(folder / "tokenizer.json"))
        tcfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHATML,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=1))
    size = tok.get_vocab_size(with_added_tokens=True)
    return size, tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")


def _random_body(cfg: dict, layout: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights (non-trivial norms) for a Llama-family body under `layout`'s names."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = h // nh
    shapes: dict[str, tuple[int, ...]] = {"model.norm.weight": (h,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if layout == "internlm2":
            shapes |= {
                p + "attention.wqkv.weight": ((nh + 2 * nkv) * hd, h),
                p + "attention.wo.weight": (h, nh * hd),
                p + "feed_forward.w1.weight": (inter, h),
                p + "feed_forward.w3.weight": (inter, h),
                p + "feed_forward.w2.weight": (h, inter),
                p + "attention_norm.weight": (h,),
                p + "ffn_norm.weight": (h,),
            }
            continue
        a, m = p + "self_attn.", p + "mlp."
        shapes |= {a + "q_proj.weight": (nh * hd, h), a + "k_proj.weight": (nkv * hd, h)}
        shapes |= {a + "v_proj.weight": (nkv * hd, h), a + "o_proj.weight": (h, nh * hd)}
        shapes |= {m + "gate_proj.weight": (inter, h), m + "up_proj.weight": (inter, h)}
        shapes |= {m + "down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,)}
        shapes |= {p + "post_attention_layernorm.weight": (h,)}
        if cfg["model_type"] == "qwen2":
            shapes |= {a + "q_proj.bias": (nh * hd,), a + "k_proj.bias": (nkv * hd,)}
            shapes |= {a + "v_proj.bias": (nkv * hd,)}
    sd = {k: torch.randn(s, generator=gen) * 0.2 for k, s in shapes.items()}
    for k, t in sd.items():
        if "norm" in k:
            t.add_(1.0)
    emb = "model.tok_embeddings.weight" if layout == "internlm2" else "model.embed_tokens.weight"
    sd[emb] = torch.randn(v, h, generator=gen)
    return sd


def random_reward_head(kind: str, h: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    if kind == "qwen2_reward":
        return {
            "score.0.weight": torch.randn(h, h, generator=gen) * h**-0.5,
            "score.0.bias": torch.randn(h, generator=gen) * 0.1,
            "score.2.weight": torch.randn(1, h, generator=gen) * h**-0.5,
            "score.2.bias": torch.randn(1, generator=gen),
        }
    name = "v_head.weight" if kind == "internlm2_reward" else "score.weight"
    return {name: torch.randn(1, h, generator=gen) * h**-0.5}


def make_tiny_reward_checkpoint(
    tmp_path: Path, kind: str = "internlm2_reward", seed: int = 0
) -> Path:
    """A tiny random-weight reward checkpoint folder (config, safetensors, tokenizer) of `kind`.

    kind: one of REWARD_KINDS. vocab_size covers the tokenizer (rounded up to a multiple of 64).
    """
    arch, layout = REWARD_KINDS[kind]
    folder = Path(tmp_path) / f"tiny-{kind}"
    folder.mkdir(parents=True, exist_ok=True)
    n_tok, eos, pad = _write_tokenizer(folder)
    model_type = {"hf": arch.split("For")[0].lower(), "internlm2": "internlm2"}[layout]
    cfg: dict = dict(TINY, architectures=[arch], model_type=model_type)
    cfg |= {
        "vocab_size": max(320, -(-n_tok // 64) * 64),
        "max_position_embeddings": 2048,
        "rope_theta": 1000000.0 if model_type in ("qwen2", "internlm2") else 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": eos,
        "pad_token_id": pad if pad is not None else eos,
    }
    if layout == "internlm2":
        cfg["bias"] = False
    gen = torch.Generator().manual_seed(seed)
    sd = _random_body(cfg, layout, gen) | random_reward_head(kind, cfg["hidden_size"], gen)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    return folder


def reward_batch(model: CausalLM, seqs: list[list[int]]) -> tuple[ForwardBatch, KVPool]:
    """All sequences prefilled together in one batch over fresh slots."""
    pool = KVPool(model.config, sum(len(s) for s in seqs) + 8, model.dtype)
    chunks, start = [], 0
    for s in seqs:
        chunks.append(SeqChunk(s, 0, list(range(start, start + len(s)))))
        start += len(s)
    return make_forward_batch(chunks, pool.pad_slot), pool


def tiny_reward_score(folder: Path, ids: list[int]) -> float:
    """The score our runtime gives `ids` on a checkpoint folder (label 0), for comparing servers."""
    model = load_model(folder)
    batch, pool = reward_batch(model, [ids])
    return float(model.score(batch, pool)[0, 0])


# ---- independent numpy reference (float64) ---------------------------------------------------
