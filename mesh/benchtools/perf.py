"""Triton's perf_analyzer (fetched by `make tools` into .tools/) run against a v2 endpoint, CSV parsed."""

from __future__ import annotations

import csv
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BINARY = Path(".tools/perf_analyzer")


@dataclass
class PerfRow:
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float


def available(binary: Path = DEFAULT_BINARY) -> bool:
    return binary.exists()


def run_perf_analyzer(
    url: str,
    model: str,
    shape: str,
    concurrency: str = "1:16:15",
    *,
    binary: Path = DEFAULT_BINARY,
    interval_ms: int = 2000,
    timeout_s: float = 240.0,
) -> tuple[list[PerfRow], str]:
    """Runs one concurrency range; returns the rows and the command line (for the report)."""
    with tempfile.TemporaryDirectory(prefix="maas-perf-") as tmp:
        out = Path(tmp) / "perf.csv"
        argv = [
            str(binary),
            "-m",
            model,
            "-i",
            "grpc",
            "-u",
            url,
            "-b",
            "1",
            "--shape",
            shape,
            "--concurrency-range",
            concurrency,
            "--measurement-interval",
            str(interval_ms),
            # This machine is noisy (one real core shared by client and servers): at 16 in flight a 50%
            # band never settles, so accept a loose band and bound the trials instead.
            "--stability-percentage",
            "200",
            "--max-trials",
            "6",
            "--percentile",
            "50",
            "-f",
            str(out),
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
        command = " ".join(argv[:-2])
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            raise RuntimeError(f"perf_analyzer failed (rc {proc.returncode}): {' | '.join(tail)}")
        return parse_csv(out.read_text()), command


def parse_csv(text: str) -> list[PerfRow]:
    rows = []
    for rec in csv.DictReader(text.splitlines()):
        rows.append(
            PerfRow(
                concurrency=int(rec["Concurrency"]),
                rps=float(rec["Inferences/Second"]),
                p50_ms=float(rec["p50 latency"]) / 1000.0,
                p99_ms=float(rec["p99 latency"]) / 1000.0,
            )
        )
    return rows
