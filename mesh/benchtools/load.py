"""Closed-loop load: N coroutines each send a request, wait for the answer, and send the next one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

Call = Callable[[], Awaitable[object]]


@dataclass
class LoadResult:
    """Figures of one load point (one concurrency against one target)."""

    concurrency: int
    requests: int
    errors: int
    elapsed_s: float
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    first_error: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        return float(np.percentile(np.asarray(self.latencies_ms), q))

    @property
    def p50_ms(self) -> float:
        return self.percentile(50)

    @property
    def p99_ms(self) -> float:
        return self.percentile(99)


async def closed_loop(
    call: Call,
    concurrency: int,
    *,
    duration_s: float = 3.0,
    warmup_s: float = 0.5,
    max_requests: int | None = None,
) -> LoadResult:
    """Runs ``concurrency`` workers that call ``call`` back to back; bounded by duration and request count.

    Requests that finish during the warm-up are not counted. Errors are counted (not raised) and do not
    stop the load; the first error's text is kept for the report.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    loop_start = time.perf_counter()
    measure_from = loop_start + warmup_s
    stop_at = measure_from + duration_s
    latencies: list[float] = []
    errors = 0
    first_error = ""
    done = 0
    measured_end = measure_from

    async def one_worker() -> None:
        nonlocal errors, first_error, done, measured_end
        while True:
            now = time.perf_counter()
            if now >= stop_at or (max_requests is not None and done >= max_requests):
                return
            t0 = now
            ok = True
            try:
                await call()
            except Exception as exc:
                ok = False
                if t0 >= measure_from:
                    errors += 1
                    if not first_error:
                        first_error = f"{type(exc).__name__}: {exc}"[:300]
            t1 = time.perf_counter()
            if t0 >= measure_from:
                done += 1
                measured_end = max(measured_end, t1)
                if ok:
                    latencies.append((t1 - t0) * 1000.0)

    await asyncio.gather(*(one_worker() for _ in range(concurrency)))
    elapsed = max(measured_end - measure_from, 1e-9)
    return LoadResult(
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        elapsed_s=elapsed,
        latencies_ms=latencies,
        first_error=first_error,
    )
