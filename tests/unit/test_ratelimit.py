"""Token-bucket rate limits per API key."""

from __future__ import annotations

import pytest

from gateway.ratelimit import RateLimiter
from mesh.errors import ResourceExhausted


class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def allowed(limiter: RateLimiter, key: str, n: int, rps: float = 0.0) -> int:
    ok = 0
    for _ in range(n):
        try:
            limiter.check(key, rps)
            ok += 1
        except ResourceExhausted:
            pass
    return ok


def test_unlimited_by_default() -> None:
    assert allowed(RateLimiter(0.0), "k", 1000) == 1000


def test_burst_then_refill() -> None:
    clock = Clock()
    limiter = RateLimiter(0.0, burst_s=1.0, clock=clock)
    assert allowed(limiter, "k", 20, rps=5) == 5
    clock.now += 0.4  # two tokens back
    assert allowed(limiter, "k", 20, rps=5) == 2
    clock.now += 100  # refills only up to the burst
    assert allowed(limiter, "k", 20, rps=5) == 5


def test_keys_are_independent_and_default_applies() -> None:
    clock = Clock()
    limiter = RateLimiter(2.0, burst_s=1.0, clock=clock)
    assert allowed(limiter, "a", 10) == 2
    assert allowed(limiter, "b", 10) == 2
    assert allowed(limiter, "c", 10, rps=4) == 4


def test_error_names_the_key_and_retry_time() -> None:
    limiter = RateLimiter(1.0, clock=Clock())
    limiter.check("k9")
    with pytest.raises(ResourceExhausted, match=r"API key 'k9' may send 1 requests/s; retry in"):
        limiter.check("k9")
