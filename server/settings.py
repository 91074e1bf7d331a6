"""Server settings: one table of options read from `NURSERVE_*` environment variables and CLI flags.

Every option has a LightLLM-style flag (`--max_total_token_num`) and an environment variable
(`NURSERVE_MAX_TOTAL_TOKEN_NUM`). `python -m server` reads both (flags win); the
`hypercorn 'server.app:create_app()'` launch reads the environment only. Engine options left
unset (None) take `runtime.engine.args.EngineArgs`'s default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .options import OPTIONS, Option

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
DASHED_ALIASES = frozenset({"api_key", "api_key_file", "protect_metrics"})


@dataclass
class Settings:
    """All settings of one server process; engine options set to None use EngineArgs' default."""

    model_dir: str | None = None
    model_name: str | None = None
    tokenizer_mode: str | None = None
    data_type: str | None = None
    max_total_token_num: int | None = None
    mem_fraction: float | None = None
    batch_max_tokens: int | None = None
    running_max_req_size: int | None = None
    max_req_total_len: int | None = None
    max_waiting_reqs: int | None = None
    eos_id: list[int] | None = None
    disable_cudagraph: bool | None = None
    disable_dynamic_prompt_cache: bool | None = None
    graph_max_batch_size: int | None = None
    graph_max_len_in_batch: int | None = None
    device: str | None = None
    seed: int | None = None
    router_token_ratio: float | None = None
    router_max_new_token_len: int | None = None
    cpu_kv_cache_bytes: int | None = None
    num_threads: int | None = None
    tp: int | None = None
    quant_type: str | None = None
    quant_mode: str | None = None
    cpu_linear: str | None = None
    cpu_attention: str | None = None
    cpu_kernels: str | None = None
    cpu_decode: str | None = None
    gpu_attention: str | None = None
    reward_kernel: str | None = None
    no_warmup: bool | None = None
    fault_inject_step: int | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    backlog: int = 2048
    max_body_bytes: int = 4 * 1024 * 1024
    shutdown_grace_s: float = 30.0
    stall_timeout_s: float = 60.0
    death_exit_delay_s: float = 0.5
    keep_alive_s: float = 10.0
    startup_timeout_s: float = 900.0
    log_level: str = "info"
    access_log: bool = False
    body_timeout_s: float = 15.0
    stream_buffer_events: int = 256
    stream_pause_bytes: int = 2048
    stream_stall_s: float = 30.0
    socket_send_buffer_bytes: int = 65536
    api_key: str | None = field(default=None, repr=False)
    api_key_file: str | None = None
    protect_metrics: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from `NURSERVE_*` variables (raises ValueError naming a bad variable)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for opt in OPTIONS:
            raw = env.get(opt.env)
            if raw is not None and (raw.strip() or opt.kind == "str"):
                values[opt.name] = _parse_env(opt, raw)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Range checks that argparse and the environment share (raises ValueError)."""
        positive = (
            "max_total_token_num",
            "batch_max_tokens",
            "running_max_req_size",
            "max_req_total_len",
            "graph_max_batch_size",
            "graph_max_len_in_batch",
            "max_body_bytes",
            "backlog",
            "router_max_new_token_len",
            "cpu_kv_cache_bytes",
            "num_threads",
            "tp",
            "stream_buffer_events",
        )
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        non_negative = (
            "max_waiting_reqs",
            "shutdown_grace_s",
            "death_exit_delay_s",
            "keep_alive_s",
            "socket_send_buffer_bytes",
            "stream_pause_bytes",
        )
        for name in non_negative:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.mem_fraction is not None and not 0.0 < self.mem_fraction <= 1.0:
            raise ValueError(f"mem_fraction must be in (0, 1], got {self.mem_fraction}")
        timeouts = ("stall_timeout_s", "startup_timeout_s", "body_timeout_s", "stream_stall_s")
        for name in timeouts:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for opt in OPTIONS:
            value = getattr(self, opt.name)
            if opt.choices and value is not None and value not in opt.choices:
                raise ValueError(
                    f"{opt.name} must be one of {', '.join(opt.choices)}, got {value!r}"
                )

    def engine_kwargs(self) -> dict[str, Any]:
        """The engine options that were set (None = leave EngineArgs' default)."""
        out: dict[str, Any] = {}
        for opt in OPTIONS:
            value = getattr(self, opt.name)
            if opt.engine and value is not None:
                out[opt.name] = value
        return out

    def to_engine_args(self) -> Any:
        """Build `runtime.engine.args.EngineArgs`; options it does not know are left out."""
        from runtime.engine.args import EngineArgs

        known = {f.name for f in dataclasses.fields(EngineArgs)}
        kwargs = {k: v for k, v in self.engine_kwargs().items() if k in known}
        return EngineArgs(**kwargs)


def _parse_env(opt: Option, raw: str) -> Any:
    """Parse one environment variable by its option's kind."""
    text = raw.strip()
    try:
        if opt.kind == "int":
            return int(text)
        if opt.kind == "float":
            return float(text)
        if opt.kind == "bool":
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")
        if opt.kind == "int_list":
            return [int(x) for x in text.replace(",", " ").split()]
        return raw
    except ValueError as exc:
        raise ValueError(f"{opt.env}={raw!r}: {exc}") from None


def _engine_default(name: str) -> str:
    """EngineArgs' default for `name`, for --help (empty when unknown)."""
    try:
        from runtime.engine.args import EngineArgs
    except ImportError:
        return ""
    for f in dataclasses.fields(EngineArgs):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f"{f.default!r}"
            if f.default_factory is not dataclasses.MISSING:
                return f"{f.default_factory()!r}"
    return ""


def build_arg_parser(env_defaults: Settings | None = None) -> argparse.ArgumentParser:
    """The `python -m server` parser; defaults come from the environment (`env_defaults`)."""
    defaults = env_defaults if env_defaults is not None else Settings()
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="nurserve: a LightLLM-compatible inference server (Quart-Trio on Hypercorn). "
        "Every flag can also be set with the environment variable shown in brackets. "
        "Exit status: 0 after a SIGTERM/SIGINT drain, 3 when the engine died, 2 on bad flags.",
    )
    for opt in OPTIONS:
        current = getattr(defaults, opt.name)
        if opt.engine and current is None:
            engine_default = _engine_default(opt.name)
            shown = f"engine default {engine_default}" if engine_default else "engine default"
        elif opt.secret:
            shown = "set" if current else "None"
        else:
            shown = repr(current)
        help_text = f"{opt.help} [{opt.env}; default: {shown}]"
        flag = f"--{opt.name}"
        # llama.cpp / vLLM spell these `--api-key`: accepted too (argparse aliases).
        names = (flag, flag.replace("_", "-")) if opt.name in DASHED_ALIASES else (flag,)
        if opt.kind == "bool":
            parser.add_argument(
                *names, action=argparse.BooleanOptionalAction, default=current, help=help_text
            )
        elif opt.kind == "int_list":
            parser.add_argument(
                flag, type=int, nargs="+", default=current, metavar="ID", help=help_text
            )
        else:
            conv: Any = {"int": int, "float": float, "str": str}[opt.kind]
            parser.add_argument(
                *names,
                dest=opt.name,
                type=conv,
                default=current,
                choices=opt.choices,
                help=help_text,
            )
    return parser


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from the environment, overridden by CLI flags (exits 2 on a bad value)."""
    parser = build_arg_parser()
    try:
        env_settings = Settings.from_env(environ)
    except ValueError as exc:
        parser.error(str(exc))
    parser = build_arg_parser(env_settings)
    namespace = parser.parse_args(argv)
    settings = Settings(**{opt.name: getattr(namespace, opt.name) for opt in OPTIONS})
    try:
        settings.check()
    except ValueError as exc:
        parser.error(str(exc))
    return settings


def markdown_table() -> str:
    """The README table of flags and environment variables."""
    lines = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    base = Settings()
    for opt in OPTIONS:
        value = getattr(base, opt.name)
        if opt.engine and value is None:
            default = _engine_default(opt.name) or "engine's"
        else:
            default = repr(value)
        meaning = opt.help + (f" ({'/'.join(opt.choices)})" if opt.choices else "")
        lines.append(f"| `--{opt.name}` | `{opt.env}` | {default} | {meaning} |")
    return "\n".join(lines)
