"""Who may open a phone call on /twilio (pure functions of the upgrade request).

Twilio cannot send an API key, so the endpoint has its own two checks, either or both:
- a shared secret: in the stream URL (`wss://host/twilio/<secret>` or `?secret=<secret>`) or in the `start`
  message's customParameters.secret (a `<Parameter name="secret" .../>` in the TwiML);
- Twilio's request signature: with an auth token configured, `X-Twilio-Signature` on the WebSocket upgrade must
  be base64(HMAC-SHA1(auth token, the URL Twilio connected to)). Behind a TLS-terminating proxy that URL is the
  public one (`twilio_public_url`, e.g. wss://voice.example.com), not what this server sees; without the setting
  it is rebuilt as wss://<Host header><path>, with and without the default port, as Twilio's own validators do.
An exposed server (API keys set, a non-loopback host, or a request relayed by a proxy) refuses /twilio unless one
of the two is configured."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

TWILIO_PATH = "/twilio"


def is_twilio_path(path: str) -> bool:
    """`path` without the query: /twilio or /twilio/<secret>."""
    return path == TWILIO_PATH or path.startswith(TWILIO_PATH + "/")


def url_secret(path_and_query: str) -> str | None:
    """The secret a stream URL carries: /twilio/<secret> or ?secret=<secret> (None if it carries none)."""
    parts = urlsplit(path_and_query)
    if parts.path.startswith(TWILIO_PATH + "/"):
        seg = unquote(parts.path[len(TWILIO_PATH) + 1:]).strip("/")
        if seg:
            return seg
    values = parse_qs(parts.query).get("secret")
    return values[0] if values else None


def signature(auth_token: str, url: str, params: dict[str, str] | None = None) -> str:
    """Twilio's request signature: base64(HMAC-SHA1(token, url + each sorted param name and value))."""
    data = url + "".join(k + v for k, v in sorted((params or {}).items()))
    return base64.b64encode(hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()).decode()


def signed_url_candidates(path_and_query: str, host: str | None, public_url: str | None) -> list[str]:
    """The URLs Twilio may have signed for this request."""
    if public_url:
        base = public_url.rstrip("/")
    elif host:
        base = "wss://" + host
    else:
        return []
    url = base + path_and_query
    parts = urlsplit(url)
    default = {"wss": 443, "https": 443, "ws": 80, "http": 80}.get(parts.scheme)
    out = [url]
    if default is not None:
        netloc = parts.netloc
        if parts.port == default:  # with and without the default port
            out.append(parts._replace(netloc=netloc.rsplit(":", 1)[0]).geturl())
        elif parts.port is None:
            out.append(parts._replace(netloc=f"{netloc}:{default}").geturl())
    return out


def signature_ok(presented: str | None, auth_token: str, candidates: list[str]) -> bool:
    if not presented:
        return False
    ok = False
    for url in candidates:  # compare against every candidate (constant time each)
        ok |= hmac.compare_digest(presented.encode(), signature(auth_token, url).encode())
    return ok


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    status: int = 200
    code: str = ""
    message: str = ""
    secret_verified: bool = False  # the URL carried the right secret (customParameters.secret not needed)


def check_upgrade(path_and_query: str, host: str | None, signature_header: str | None, *, secret: str | None,
                  auth_token: str | None, public_url: str | None, exposed: bool) -> Verdict:
    """May this WebSocket upgrade on /twilio proceed?"""
    if exposed and not secret and not auth_token:
        return Verdict(False, 403, "twilio_auth_not_configured",
                       "/twilio on an exposed server needs --twilio-auth-token or --twilio-secret (docs/phone.md)")
    if auth_token and not signature_ok(signature_header, auth_token,
                                       signed_url_candidates(path_and_query, host, public_url)):
        code = "invalid_signature" if signature_header else "missing_signature"
        return Verdict(False, 403, code, "X-Twilio-Signature is missing or does not match this URL "
                       "(behind a proxy, set --twilio-public-url to the URL in your TwiML)")
    presented = url_secret(path_and_query)
    verified = False
    if presented is not None and secret:
        if not hmac.compare_digest(presented.encode(), secret.encode()):
            return Verdict(False, 403, "invalid_secret", "wrong shared secret in the stream URL")
        verified = True
    return Verdict(True, secret_verified=verified)
