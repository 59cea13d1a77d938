"""grpcio's process-wide switches, which it reads once, when `grpc` is first imported.

`mesh/__init__.py` imports this module, and every service package imports `mesh` before anything
else, so the switches are in place before grpc loads in `python -m gateway|router|workers|compressor`,
`maas` and the benchmark tools. A value the operator exported wins over the default here.

`GRPC_EXPERIMENTS=-event_engine_poller_for_python`: grpcio 1.81 turns on, by default, an experiment
that changes how a Python process polls for gRPC I/O. Turned off, on the 2-vCPU development VM, a bare
grpc.aio echo server under closed-loop load (perf_analyzer, concurrency 1) makes about 2.4× fewer
voluntary context switches, its p50 drops from about 0.47 to 0.41 ms, and a bare Python proxy in front
of it adds about 0.33 ms instead of 0.41 ms. docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import os

GRPC_EXPERIMENTS = "-event_engine_poller_for_python"

os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
