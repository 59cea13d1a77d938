"""Worker settings, read from MAAS_WORKER_* environment variables (plus the common MAAS_* ones)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from mesh.settings import MeshSettings


class WorkerSettings(MeshSettings):
    """Configuration of one inference worker process."""

    model_config = SettingsConfigDict(env_prefix="MAAS_WORKER_", extra="ignore", populate_by_name=True)

    bind: str = "127.0.0.1:8201"
    """host:port the gRPC server binds (v2 inference + maas.v1.WorkerControl); port 0 picks a free one."""

    advertise_address: str = ""
    """host:port other services use to reach this worker; empty = the bound address."""

    worker_id: str = ""
    """Stable identity in the registry; empty = "<hostname>-<pid>-<random>"."""

    device: str = "auto"
    """"auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N"."""

    memory_budget_bytes: int = 0
    """Model memory this worker may hold before LRU eviction; 0 = 80% of GPU memory / 50% of RAM."""

    heartbeat_interval_s: float = 1.0
    """Seconds between registry heartbeats."""

    heartbeat_ttl_s: float = 5.0
    """Lifetime of a heartbeat key: a dead worker disappears from the registry after this long."""

    drain_timeout_s: float = 30.0
    """Longest wait for in-flight requests on SIGTERM or Drain before the worker stops anyway."""

    preload: str = ""
    """Versions to load at start, e.g. "digits:1,encoder:latest" (read from the registry)."""

    metrics_port: int = 0
    """Prometheus HTTP port; 0 = no metrics server (-1 = an ephemeral port, for tests)."""

    compute_threads: int = 4
    """Threads that run forward passes (and decoupled generators); the event loop never computes."""

    load_threads: int = 1
    """Threads that verify and load artifacts, apart from compute so loading never stalls traffic."""

    torch_threads: int = 0
    """torch intra-op threads; 0 = auto: half the CPUs on a CPU device (the rest serve gRPC), torch's default on CUDA."""

    stream_max_in_flight: int = Field(default=64, ge=1)
    """Requests one ModelStreamInfer stream may have in flight, and responses it may have waiting for its
    client: at the bound the worker stops reading the stream (HTTP/2 flow control holds the client back)
    and a decoupled model stops generating, until the client reads. A request counts until its last
    response has left for the client."""

    mux_max_in_flight: int = Field(default=1024, ge=1)
    """Requests the gateway's multiplexed stream (maas.v1.WorkerInference) may have in flight here before
    the worker stops reading it; it carries every client of the gateway, hence the larger bound."""

    warmup: bool = True
    """Run each version once on dummy inputs while loading."""

    graph_rewrites: bool = True
    """Rewrite each exported graph at load, exactly (workers/graphopt.py: folded input scales, addmm,
    in-place relu), after checking it gives the same outputs bit for bit; false = run graphs as saved."""

    uvloop: bool = True
    """Use uvloop when installed (python -m workers only)."""

    registry: bool = True
    """Heartbeat into / preload from the registry at redis_url; false (or redis_url unset) = standalone."""
