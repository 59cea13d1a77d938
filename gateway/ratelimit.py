"""Per-key request rate limits: one token bucket per API key, refused with RESOURCE_EXHAUSTED."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from mesh.errors import ResourceExhausted


@dataclass(slots=True)
class TokenBucket:
    """Refills `rate` tokens per second up to `burst`; each request takes one."""

    rate: float
    burst: float
    tokens: float
    last: float

    def take(self, now: float) -> bool:
        tokens = self.tokens + (now - self.last) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.last = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False

    def retry_after(self) -> float:
        return max(0.0, (1.0 - self.tokens) / self.rate) if self.rate > 0 else 0.0


class RateLimiter:
    """Token buckets keyed by API key id.

    A key's own `rate_limit_rps` wins; 0 means the gateway default; a default of 0 means unlimited.
    The burst is `burst_s` seconds' worth of requests (at least one request).
    """

    def __init__(
        self, default_rps: float = 0.0, *, burst_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.default_rps = default_rps
        self.burst_s = burst_s
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, key_id: str, rps: float = 0.0) -> None:
        """Takes one token for `key_id` or raises ResourceExhausted."""
        rate = rps if rps > 0 else self.default_rps
        if rate <= 0:
            return
        now = self._clock()
        bucket = self._buckets.get(key_id)
        if bucket is None or bucket.rate != rate:
            burst = max(1.0, rate * self.burst_s)
            bucket = TokenBucket(rate=rate, burst=burst, tokens=burst, last=now)
            self._buckets[key_id] = bucket
        if not bucket.take(now):
            who = f"API key '{key_id}'" if key_id else "anonymous callers"
            raise ResourceExhausted(
                f"rate limit: {who} may send {rate:g} requests/s; retry in {bucket.retry_after():.3f} s"
            )
