"""API keys: `Authorization: Bearer <key>` on every route but the health probes.

Keys come from `--api_key` (`NURSERVE_API_KEY`, comma-separated for several) and
`--api_key_file` (one per line, `#` comments). The presented key is compared with every
configured key by `hmac.compare_digest`, without stopping at a match, so the time taken does
not tell which key (or how much of one) matched. LightLLM has no keys; llama.cpp, vLLM and
SGLang check the same header.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from quart import Quart, request

from .errors import ApiError
from .settings import Settings

# Probes stay open so that load balancers and supervisors need no secret.
OPEN_PATHS = frozenset({"/health", "/healthz", "/liveness", "/readiness"})


def load_keys(settings: Settings) -> tuple[bytes, ...]:
    """Every configured key, as bytes (empty: no authentication). Raises ValueError."""
    keys: list[str] = []
    if settings.api_key:
        keys += [k.strip() for k in settings.api_key.split(",")]
    if settings.api_key_file:
        try:
            text = Path(settings.api_key_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"api_key_file {settings.api_key_file!r}: {exc}") from None
        keys += [line.strip() for line in text.splitlines() if not line.startswith("#")]
    out = tuple(k.encode("utf-8") for k in keys if k)
    if (settings.api_key or settings.api_key_file) and not out:
        raise ValueError("api_key / api_key_file are set but name no key")
    return out


def key_matches(presented: bytes, keys: tuple[bytes, ...]) -> bool:
    """True when `presented` equals one of `keys`; compares against all of them."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented, key)
    return found


def bearer_token(header: str | None) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode("utf-8", "surrogateescape")


def install_auth(app: Quart, settings: Settings) -> None:
    """Check the key before every protected route (nothing is installed without keys)."""
    keys = load_keys(settings)
    if not keys:
        return
    open_paths = OPEN_PATHS if settings.protect_metrics else OPEN_PATHS | {"/metrics"}

    @app.before_request
    async def _check_key() -> None:
        if request.path in open_paths:
            return
        token = bearer_token(request.headers.get("Authorization"))
        if token is None or not key_matches(token, keys):
            why = "missing" if token is None else "invalid"
            raise ApiError(
                401,
                f"{why} API key: send the header 'Authorization: Bearer <key>'",
                "authorization",
                type_="authentication_error",
                headers={"WWW-Authenticate": 'Bearer realm="nurserve"'},
                code="invalid_api_key",
            )
