"""Shared pytest fixtures."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.server_helpers import MAX_LEN, Factory

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from runtime.model.runner import ModelRunner
    from runtime.text.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model's HF folder (SmolLM2-135M-Instruct Q4_1), converted once and cached."""
    from runtime.loading.default_model import default_model_dir as _default_model_dir

    return _default_model_dir()


@pytest.fixture(scope="session")
def runner_and_tokenizer(default_model_dir: object) -> tuple[ModelRunner, Tokenizer]:
    """The default model, loaded once (for the in-process app tests)."""
    from runtime.engine.args import EngineArgs
    from runtime.engine.loader import load_runner

    return load_runner(EngineArgs(max_total_token_num=4096, max_req_total_len=MAX_LEN))


@pytest.fixture(scope="session")
def tokenizer(runner_and_tokenizer: tuple[ModelRunner, Tokenizer]) -> Tokenizer:
    """The default model's tokenizer."""
    return runner_and_tokenizer[1]


@pytest.fixture
def make_app(runner_and_tokenizer: tuple[ModelRunner, Tokenizer]) -> Factory:
    """Build an app on a fresh engine around the shared weights."""
    from runtime.engine.async_engine import AsyncEngine
    from runtime.engine.core import EngineCore
    from server.app import create_app
    from server.settings import Settings

    runner, tokenizer = runner_and_tokenizer

    def factory(deaths: list[BaseException] | None = None, **engine_overrides: Any) -> QuartTrio:
        settings = Settings(max_body_bytes=64 * 1024, death_exit_delay_s=0.05)

        def engine_factory(s: Settings) -> AsyncEngine:
            args = replace(s.to_engine_args(), max_total_token_num=4096, **engine_overrides)
            engine = AsyncEngine(args)
            engine._load = lambda: EngineCore(runner, tokenizer, args)  # type: ignore[method-assign]
            return engine

        sink = deaths if deaths is not None else []
        return create_app(settings, engine_factory=engine_factory, on_engine_death=sink.append)

    return factory
