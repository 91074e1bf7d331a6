"""Hypercorn settings for the CLI launch, from the same `NURSERVE_*` variables.

    hypercorn --config python:server.hypercorn_config 'server.app:create_app()'

gives the trio worker, a 2048 backlog (Hypercorn's default 100 drops connections in bursts),
the shutdown grace and a startup timeout long enough for the first model conversion. Flags
given on the hypercorn command line (`--bind`, `--backlog`, ...) override these.
"""

from __future__ import annotations

from server.settings import Settings as _Settings

_settings = _Settings.from_env()

worker_class = "trio"
bind = [f"{_settings.host}:{_settings.port}"]
backlog = _settings.backlog
graceful_timeout = _settings.shutdown_grace_s
keep_alive_timeout = _settings.keep_alive_s
startup_timeout = _settings.startup_timeout_s
shutdown_timeout = max(10.0, _settings.shutdown_grace_s + 5.0)
accesslog = "-" if _settings.access_log else None
errorlog = "-"
