"""The Quart-Trio app and its lifetime: the engine loop runs in the app's nursery.

Launch with either

    hypercorn --worker-class trio 'server.app:create_app()' --bind 0.0.0.0:8080
    python -m server --model_dir DIR --port 8080

Serving starts only once the model is loaded (`await app.nursery.start(engine.run)` in
`before_serving`). If the engine loop dies, the app answers 503 everywhere, in-flight
requests get the engine's ErrorEvent, and after `death_exit_delay_s` the process exits with
status 3 so that a supervisor restarts it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from quart_trio import QuartTrio

from . import generation, openai_routes, openapi, routes
from .auth import install_auth
from .errors import register_error_handlers
from .guard import ConnectionGuard
from .settings import Settings
from .state import STATE_KEY, EngineLike, ServerState

log = logging.getLogger("nurserve.server")

ENGINE_DEATH_EXIT_STATUS = 3

EngineFactory = Callable[[Settings], EngineLike]
DeathHook = Callable[[BaseException], None]


def build_engine(settings: Settings) -> EngineLike:
    """The real engine (imports torch lazily)."""
    from runtime.engine.async_engine import AsyncEngine

    engine: EngineLike = AsyncEngine(settings.to_engine_args())
    return engine


def _hypercorn_master_pid() -> int | None:
    """The pid of the hypercorn CLI master when this process is one of its workers."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None:
        return None
    try:
        cmdline = Path(f"/proc/{parent.pid}/cmdline").read_bytes()
    except OSError:
        return None
    return parent.pid if b"hypercorn" in cmdline else None


def exit_process(exc: BaseException) -> None:
    """Default death hook: flush the logs and leave with status 3 (works under any launcher).

    Under the hypercorn CLI's worker processes (the default `--workers 1`), the master returns
    0 whatever status its worker exits with (hypercorn 0.18 `run.py` overwrites the status),
    so the worker also SIGKILLs its master: the supervisor then sees a non-zero status (-9).
    """
    log.critical("engine died (%r); exiting with status %d", exc, ENGINE_DEATH_EXIT_STATUS)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    master = _hypercorn_master_pid()
    if master is not None:
        os.kill(master, signal.SIGKILL)
    os._exit(ENGINE_DEATH_EXIT_STATUS)


class _StartedFlag:
    """Wraps a task_status to remember whether `started()` was called."""

    def __init__(self, inner: trio.TaskStatus[Any]) -> None:
        self.inner = inner
        self.done = False

    def started(self, value: Any = None) -> None:
        self.done = True
        self.inner.started(value)


async def _supervise_engine(
    state: ServerState,
    engine: EngineLike,
    scope: trio.CancelScope,
    on_death: DeathHook,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the engine loop; a failure after startup marks the app dead and ends the process."""
    flag = _StartedFlag(task_status)
    failure: BaseException | None = None
    with scope:
        try:
            await engine.run(task_status=flag)
        except Exception as exc:
            if not flag.done:
                raise  # startup failed: nursery.start() re-raises it, Hypercorn exits
            failure = exc
        else:
            if not state.shutting_down:
                failure = RuntimeError("the engine loop returned unexpectedly")
    if failure is None or state.shutting_down:
        return
    state.death = failure
    log.critical("engine loop failed; answering 503 and exiting", exc_info=failure)
    await trio.sleep(state.settings.death_exit_delay_s)
    on_death(failure)


def _configure_logging(level: str) -> None:
    """Log to stderr unless the host application configured logging already."""
    logger = logging.getLogger("nurserve")
    logger.setLevel(level.upper())
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


def create_app(
    settings: Settings | None = None,
    *,
    engine_factory: EngineFactory | None = None,
    on_engine_death: DeathHook | None = None,
) -> QuartTrio:
    """Build the app; `settings` default to the `NURSERVE_*` environment variables."""
    if settings is None:
        settings = Settings.from_env()
    _configure_logging(settings.log_level)
    app = QuartTrio("nurserve")
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        BODY_TIMEOUT=settings.body_timeout_s,
        PROVIDE_AUTOMATIC_OPTIONS=False,
    )
    state = ServerState(settings)
    app.extensions[STATE_KEY] = state
    guard = ConnectionGuard(app.asgi_app, settings.max_body_bytes, settings.body_timeout_s)
    app.asgi_app = guard  # type: ignore[method-assign,assignment]
    state.guard = guard
    install_auth(app, settings)
    app.register_blueprint(routes.bp)
    app.register_blueprint(generation.bp)
    app.register_blueprint(openai_routes.bp)
    app.register_blueprint(openapi.bp)
    register_error_handlers(app)
    factory = engine_factory or build_engine
    hook = on_engine_death or exit_process
    engine_scope = trio.CancelScope()
    pacer_scope = trio.CancelScope()  # after_serving ends the pacer: the nursery waits for it

    async def _pace() -> None:
        with pacer_scope:
            await state.pacer.run()

    @app.before_serving
    async def _start_engine() -> None:
        engine = factory(settings)
        state.engine = engine
        await app.nursery.start(_supervise_engine, state, engine, engine_scope, hook)
        if state.pacer.enabled:
            app.nursery.start_soon(_pace)
        state.ready = True
        name = engine.info.model_name if engine.info is not None else "?"
        log.info("engine ready: model %s", name)

    @app.after_serving
    async def _stop_engine() -> None:
        state.shutting_down = True
        engine_scope.cancel()
        pacer_scope.cancel()

    return app


def get_app_state(app: QuartTrio) -> ServerState:
    """The ServerState of an app (tests and __main__)."""
    state: ServerState = app.extensions[STATE_KEY]
    return state
