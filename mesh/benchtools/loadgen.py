"""The load generator as a process of its own: one closed-loop point, its figures as one JSON line.

Run in its own process (``python -m mesh.benchtools.loadgen URL WORKLOAD -c N``), the client does not
share an event loop or a GIL with the benchmark's stack supervisor. Besides latency and throughput it
reports the CPU time that each process named with ``--pid NAME=PID`` (and the client itself) spent per
request during the measured window, read from /proc/<pid>/stat: on a shared machine that is the figure
that says where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh.benchtools.load import closed_loop

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


@dataclass
class PointSummary:
    """Figures of one load point; with several runs, the median of each figure over the runs."""

    concurrency: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    first_error: str = ""
    runs: int = 1
    cpu_ms: dict[str, float] = field(default_factory=dict)
    """CPU milliseconds per request, by process name ("client" = the load generator)."""

    @classmethod
    def median_of(cls, points: Sequence[PointSummary]) -> PointSummary:
        if not points:
            raise ValueError("no runs to summarize")
        names = {name for p in points for name in p.cpu_ms}
        return cls(
            concurrency=points[0].concurrency,
            requests=sum(p.requests for p in points),
            errors=sum(p.errors for p in points),
            rps=statistics.median(p.rps for p in points),
            p50_ms=statistics.median(p.p50_ms for p in points),
            p99_ms=statistics.median(p.p99_ms for p in points),
            first_error=next((p.first_error for p in points if p.first_error), ""),
            runs=len(points),
            cpu_ms={
                name: statistics.median(p.cpu_ms[name] for p in points if name in p.cpu_ms)
                for name in sorted(names)
            },
        )


async def _run(
    url: str,
    workload_name: str,
    concurrency: int,
    *,
    duration_s: float,
    warmup_s: float,
    model: str,
    version: str,
    token: str | None,
    pids: dict[str, int],
) -> PointSummary:
    import tritonclient.grpc.aio as aioclient

    from mesh.benchtools.targets import WORKLOADS, infer_call

    client = aioclient.InferenceServerClient(url)
    try:
        call = infer_call(client, WORKLOADS[workload_name], model=model, version=version, token=token)
        await call()  # connect (and fail fast) before measuring
        if warmup_s > 0:
            await closed_loop(call, concurrency, duration_s=warmup_s, warmup_s=0.0)
        before = {name: process_cpu_s(pid) for name, pid in pids.items()}
        me = time.process_time()
        result = await closed_loop(call, concurrency, duration_s=duration_s, warmup_s=0.0)
        client_s = time.process_time() - me
        after = {name: process_cpu_s(pid) for name, pid in pids.items()}
    finally:
        await client.close()
    done = max(1, result.requests + result.errors)
    cpu = {"client": client_s * 1000.0 / done}
    for name in pids:
        b, a = before[name], after[name]
        if b is not None and a is not None:
            cpu[name] = (a - b) * 1000.0 / done
    return PointSummary(
        concurrency=concurrency,
        requests=result.requests,
        errors=result.errors,
        rps=result.rps,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        first_error=result.first_error,
        cpu_ms=cpu,
    )


def run_point(
    url: str,
    workload: str,
    concurrency: int,
    *,
    duration_s: float = 3.0,
    warmup_s: float = 0.5,
    model: str = "",
    version: str = "",
    token: str | None = None,
    pids: dict[str, int] | None = None,
    python: str = sys.executable,
    timeout_s: float | None = None,
) -> PointSummary:
    """One point measured by a fresh load-generator process; raises RuntimeError when it fails."""
    argv = [python, "-m", "mesh.benchtools.loadgen", url, workload, "-c", str(concurrency)]
    argv += ["--duration", str(duration_s), "--warmup", str(warmup_s)]
    if model:
        argv += ["--model", model]
    if version:
        argv += ["--version", version]
    for name, pid in (pids or {}).items():
        argv += ["--pid", f"{name}={pid}"]
    env = dict(os.environ)
    if token:
        env["MAAS_TOKEN"] = token
    limit = timeout_s if timeout_s is not None else duration_s + warmup_s + 120.0
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"load generator failed (rc {proc.returncode}) against {url}: {tail}")
    data: dict[str, Any] = json.loads(lines[-1])
    return PointSummary(**data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url")
    parser.add_argument("workload", help="digits, encoder or echo (mesh.benchtools.targets.WORKLOADS)")
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds first")
    parser.add_argument("--model", default="", help="model name (default: the workload's)")
    parser.add_argument("--version", default="")
    parser.add_argument("--pid", action="append", default=[], help="NAME=PID whose CPU time to report")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    pids = {}
    for item in args.pid:
        name, _, pid = item.partition("=")
        pids[name] = int(pid)
    if not args.no_uvloop:
        from mesh.server import install_uvloop

        install_uvloop()
    summary = asyncio.run(
        _run(
            args.url,
            args.workload,
            args.concurrency,
            duration_s=args.duration,
            warmup_s=args.warmup,
            model=args.model,
            version=args.version,
            token=os.environ.get("MAAS_TOKEN") or None,
            pids=pids,
        )
    )
    print(json.dumps(summary.__dict__), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
