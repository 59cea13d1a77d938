"""Compressor settings, read from MAAS_COMPRESSOR_* environment variables (plus the common MAAS_* fields)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from mesh.settings import MeshSettings


class CompressorSettings(MeshSettings):
    """Where the compressor listens and how it takes jobs from the queue."""

    model_config = SettingsConfigDict(env_prefix="MAAS_COMPRESSOR_", extra="ignore", populate_by_name=True)

    bind: str = "127.0.0.1:8301"
    """host:port of the CompressorService gRPC server (":0" picks a free port)."""

    metrics_port: int = 0
    """Port of the Prometheus metrics HTTP server; 0 = no metrics server."""

    run_jobs: bool = True
    """Take jobs from the queue; false = only accept, watch and list them (a front end)."""

    lease_s: float = 30.0
    """A job whose compressor has not renewed its lease for this long is reclaimed by another one."""

    poll_s: float = 0.2
    """How often WatchJob re-reads a job record, and how often progress is written to it."""

    device: str = "auto"
    """Device for jobs that ask for "auto": auto (CUDA when present), cpu or cuda."""

    latency_batch: int = 64
    """Batch size at which parent and result latencies are measured."""

    latency_iters: int = 100
    """Forward passes per latency repeat (5 repeats, median)."""

    torch_threads: int = 0
    """torch intra-op threads for jobs; 0 = torch's default. Use 1 on hosts shared with other work."""

    work_dir: str = ""
    """Scratch directory for results before they enter the store; "" = <var_dir>/compressor."""

    grace_s: float = 10.0
    """On SIGTERM, how long running RPCs get to finish; a running job is left for another compressor."""
