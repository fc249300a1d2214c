"""Abuse limits a deployment expects (pure bookkeeping; the server passes the clock in):
connection attempts per client address and per API key per minute (token buckets), and the longest a session
may last. Refusals are decided here; server.py turns them into HTTP 429 / close codes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated_s: float


class RateLimiter:
    """`per_min` events per key per minute, bursts of up to `per_min` (a token bucket refilled at per_min/60 per
    second). per_min <= 0 disables it. At most `max_keys` keys are remembered: full buckets (idle keys) are
    forgotten first, and if every bucket is in use the oldest is, so memory stays bounded under any traffic."""

    def __init__(self, per_min: int, *, max_keys: int = 65_536):
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.per_min = per_min
        self.max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def _refill(self, b: _Bucket, now_s: float) -> None:
        b.tokens = min(float(self.per_min), b.tokens + (now_s - b.updated_s) * self.per_min / 60.0)
        b.updated_s = now_s

    def acquire(self, key: str, now_s: float) -> float:
        """Take one token for `key`: 0.0 if allowed, else the seconds until one is available (retry-after)."""
        if self.per_min <= 0:
            return 0.0
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self.max_keys:
                self._evict(now_s)
            b = self._buckets[key] = _Bucket(float(self.per_min), now_s)
        else:
            self._refill(b, now_s)
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0.0
        return (1.0 - b.tokens) * 60.0 / self.per_min

    def _evict(self, now_s: float) -> None:
        for k, b in list(self._buckets.items()):
            self._refill(b, now_s)
            if b.tokens >= self.per_min:
                del self._buckets[k]
        while len(self._buckets) >= self.max_keys:  # every key is busy: forget the least recently updated
            del self._buckets[min(self._buckets, key=lambda k: self._buckets[k].updated_s)]


@dataclass(slots=True)
class Refusal:
    reason: str  # metrics label: "rate_address" | "rate_key"
    code: str
    message: str
    retry_after_s: float


class ConnectionLimits:
    """Per-address and per-API-key connection-attempt rates. The address limit counts every attempt (also
    ones later refused for a wrong key, so guessing keys is slow); the key limit counts accepted keys only."""

    def __init__(self, per_address_per_min: int, per_key_per_min: int, *, max_keys: int = 65_536):
        self.addresses = RateLimiter(per_address_per_min, max_keys=max_keys)
        self.keys = RateLimiter(per_key_per_min, max_keys=max_keys)

    def check_address(self, address: str, now_s: float) -> Refusal | None:
        wait = self.addresses.acquire(address, now_s)
        if wait <= 0:
            return None
        return Refusal("rate_address", "rate_limit_exceeded",
                       f"too many connection attempts from this address (limit "
                       f"{self.addresses.per_min} per minute)", wait)

    def check_key(self, key: str | None, now_s: float) -> Refusal | None:
        if not key:
            return None
        # Keyed by a digest: the limiter never holds a secret.
        wait = self.keys.acquire(hashlib.sha256(key.encode()).hexdigest(), now_s)
        if wait <= 0:
            return None
        return Refusal("rate_key", "rate_limit_exceeded",
                       f"too many connections with this API key (limit {self.keys.per_min} per minute)", wait)


def receive_timeout(now_s: float, started_s: float, *, idle_timeout_s: float,
                    max_session_s: float) -> tuple[float, str]:
    """How long the server may wait for the next client frame, and what ends the session if none comes:
    ("idle_timeout" | "session_expired"). max_session_s <= 0: no session-length limit."""
    if max_session_s <= 0:
        return idle_timeout_s, "idle_timeout"
    left = started_s + max_session_s - now_s
    if left <= idle_timeout_s:
        return max(0.0, left), "session_expired"
    return idle_timeout_s, "idle_timeout"
