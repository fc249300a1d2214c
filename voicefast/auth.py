"""Who may open a realtime session (pure functions of the handshake headers)."""

from __future__ import annotations

import hmac
import ipaddress
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


def host_name(host: str | None) -> str:
    """The name part of a Host header, lower-case, without port or IPv6 brackets ("" if absent)."""
    h = (host or "").strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else ""
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_ok(host: str | None, api_keys: tuple[str, ...], allowed_hosts: tuple[str, ...]) -> bool:
    """DNS-rebinding guard. With API keys the key is the gate. Without, a web page could point its own hostname
    at 127.0.0.1 and drive the server as a same-origin page; so only a loopback Host (localhost, 127.0.0.0/8,
    ::1) or one of the configured public names is served."""
    if api_keys:
        return True
    name = host_name(host)
    return is_loopback(name) or name in {h.lower() for h in allowed_hosts}


def choose_subprotocol(offered: list[str]) -> str | None:
    """`realtime` when offered, else the first offer that carries no API key: the key is never echoed back.
    A browser that offered only the key subprotocol is refused before this (see key_only_subprotocols)."""
    if "realtime" in offered:
        return "realtime"
    return next((p for p in offered if not p.startswith(KEY_SUBPROTOCOL_PREFIX)), None)


def key_only_subprotocols(offered: list[str]) -> bool:
    """Every offered subprotocol carries the key: selecting one would echo the key, selecting none fails a
    browser's handshake; such a client is told to offer `realtime` too."""
    return bool(offered) and all(p.startswith(KEY_SUBPROTOCOL_PREFIX) for p in offered)
