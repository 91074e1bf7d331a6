"""`python -m server`: LightLLM-style flags, Hypercorn (trio worker) run programmatically.

Exit status: 0 after a SIGTERM/SIGINT drain, 3 when the engine died, 2 on bad flags. A second
signal during the drain exits at once with status 1.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio import serve

from .app import ENGINE_DEATH_EXIT_STATUS, create_app, get_app_state
from .auth import load_keys
from .settings import Settings, parse_args
from .state import ServerState

log = logging.getLogger("nurserve.server")


class ServerConfig(Config):
    """Hypercorn's Config whose listening sockets carry `SO_SNDBUF` (accepted ones inherit it).

    With the kernel's autotuned send buffer (up to megabytes), a client that stops reading
    looks like a fast one for thousands of tokens; a small buffer makes the stream's writes
    block, so its `--stream_buffer_events` bound is reached and the request aborted.
    """

    send_buffer_bytes = 0

    def create_sockets(self) -> Sockets:
        """Hypercorn's sockets, with the send buffer set on the TCP ones."""
        sockets = super().create_sockets()
        if self.send_buffer_bytes > 0:
            for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes)
        return sockets


def hypercorn_config(settings: Settings) -> Config:
    """The Hypercorn config of `python -m server`."""
    config = ServerConfig()
    config.send_buffer_bytes = settings.socket_send_buffer_bytes
    config.worker_class = "trio"
    host = settings.host
    config.bind = [f"[{host}]:{settings.port}" if ":" in host else f"{host}:{settings.port}"]
    config.backlog = settings.backlog
    config.graceful_timeout = settings.shutdown_grace_s
    config.keep_alive_timeout = settings.keep_alive_s
    config.startup_timeout = settings.startup_timeout_s
    config.shutdown_timeout = max(10.0, settings.shutdown_grace_s + 5.0)
    config.loglevel = settings.log_level.upper()
    config.accesslog = "-" if settings.access_log else None
    config.errorlog = "-"
    return config


async def _drain(stop: trio.Event, state: ServerState) -> None:
    """Keep listening while the in-flight requests finish (new generations get 503 +
    Retry-After, /readiness 503), at most `shutdown_grace_s`; then stop Hypercorn, whose
    `graceful_timeout` cuts whatever is left."""
    with trio.move_on_after(state.settings.shutdown_grace_s):
        while True:  # polls a counter (no event to wait on), 20 times a second
            if state.in_flight <= 0 or stop.is_set():
                break
            await trio.sleep(0.05)
    stop.set()


async def _watch_signals(stop: trio.Event, state: ServerState) -> None:
    """First SIGTERM/SIGINT: graceful stop (/readiness turns 503); a second one: exit now."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async for signum in signals:
                if not state.shutting_down and not stop.is_set():
                    name = signal.Signals(signum).name
                    log.info("received %s: draining in-flight requests", name)
                    state.shutting_down = True
                    nursery.start_soon(_drain, stop, state)
                else:
                    log.warning("second signal: exiting now")
                    logging.shutdown()
                    os._exit(1)


async def _serve(settings: Settings) -> int:
    """Serve until a signal or the engine's death; returns the exit status."""
    stop = trio.Event()
    status = 0

    def on_engine_death(exc: BaseException) -> None:
        nonlocal status
        status = ENGINE_DEATH_EXIT_STATUS
        stop.set()
        # Backstop: if the drain hangs, leave anyway.
        timer = threading.Timer(
            settings.shutdown_grace_s + 10.0, os._exit, (ENGINE_DEATH_EXIT_STATUS,)
        )
        timer.daemon = True
        timer.start()

    app = create_app(settings, on_engine_death=on_engine_death)
    config = hypercorn_config(settings)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, stop, get_app_state(app))
        await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    return status


def _leaf_message(exc: BaseException) -> str:
    """The innermost error of an exception group, as one line."""
    inner = getattr(exc, "exceptions", None)
    while inner:
        exc = inner[0]
        inner = getattr(exc, "exceptions", None)
    return f"{type(exc).__name__}: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    settings = parse_args(argv)
    try:
        load_keys(settings)
    except ValueError as exc:
        print(f"python -m server: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        status = trio.run(_serve, settings)
    except KeyboardInterrupt:
        status = 1
    except BaseException as exc:
        log.debug("server failed", exc_info=exc)
        log.critical("server failed: %s", _leaf_message(exc))
        status = 1
    if status == ENGINE_DEATH_EXIT_STATUS:
        log.critical("exiting with status %d: the engine died", status)
    return status


if __name__ == "__main__":
    sys.exit(main())
