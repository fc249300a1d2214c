"""Who may open a realtime session (pure functions of the handshake headers)."""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."


def offered_subprotocols(header: str | None) -> list[str]:
    return [p.strip() for p in (header or "").split(",") if p.strip()]


def presented_key(authorization: str | None, subprotocols: list[str]) -> str | None:
    """The API key from `Authorization: Bearer <key>` or the browser subprotocol `openai-insecure-api-key.<key>`."""
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    for p in subprotocols:
        if p.startswith(KEY_SUBPROTOCOL_PREFIX):
            return p[len(KEY_SUBPROTOCOL_PREFIX):]
    return None


def key_ok(key: str | None, api_keys: tuple[str, ...]) -> bool:
    if not api_keys:
        return True
    if not key:
        return False
    # constant-time compare against every configured key
    return any(hmac.compare_digest(key.encode(), k.encode()) for k in api_keys)


def origin_ok(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Non-browser clients send no Origin: allowed (they are gated by the API key). Browsers: same-origin
    always, other origins only when listed (or "*")."""
    if origin is None:
        return True
    origin = origin.rstrip("/")
    if "*" in allowed or origin in allowed:
        return True
    netloc = urlsplit(origin).netloc
    return bool(host) and netloc.lower() == host.lower()


def choose_subprotocol(offered: list[str]) -> str | None:
    """Accept `realtime` when offered; a browser that offered only the key subprotocol gets that echoed
    (a browser fails the handshake if none of its offers is selected)."""
    if "realtime" in offered:
        return "realtime"
    return offered[0] if offered else None
