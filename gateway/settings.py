"""Gateway settings, read from MAAS_GATEWAY_* environment variables (plus the common MAAS_* ones)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from mesh.settings import MeshSettings


class GatewaySettings(MeshSettings):
    """Public v2 front door: where it listens, how it finds workers, who may call it, how hard it merges."""

    model_config = SettingsConfigDict(env_prefix="MAAS_GATEWAY_", extra="ignore", populate_by_name=True)

    bind: str = "127.0.0.1:8001"
    """host:port of the public KServe v2 gRPC port ("127.0.0.1:0" picks a free port)."""

    metrics_port: int = 8002
    """Prometheus metrics HTTP port on 127.0.0.1 (0 = an ephemeral port, -1 = no metrics server)."""

    metrics_addr: str = "127.0.0.1"
    """Address the metrics HTTP server binds."""

    router_address: str = "127.0.0.1:8101"
    """host:port of the router whose route table the gateway follows."""

    router_api_key: SecretStr | None = None
    """API key (bearer token) the gateway sends to the router, for a router that requires keys
    (MAAS_ROUTER_AUTH_MODE): any valid key lets it follow the route table; RepositoryModelLoad/Unload
    (the router's Place) also need the admin role. Unset or empty: no key is sent."""

    startup_table_timeout_s: float = 10.0
    """How long startup waits for the first route table before serving anyway (requests then answer
    UNAVAILABLE until a table arrives)."""

    auth_mode: Literal["auto", "required", "optional", "disabled"] = "auto"
    """API keys: "auto" = required when `bind` is not a loopback address, optional on loopback;
    "required"; "optional" (a key that is sent must be valid); "disabled" (no checks, even on a public
    address: an explicit opt-out)."""

    auth_cache_ttl_s: float = 2.0
    """How long a verified (or refused) key is cached; a revoked key stops working within this time."""

    auth_stale_s: float = 300.0
    """While the registry is unreachable, keys verified within this many seconds keep working."""

    rate_limit_rps: float = 0.0
    """Default requests/s per API key (a key's own limit wins); 0 = unlimited."""

    rate_limit_burst_s: float = 1.0
    """Burst allowance of a key, in seconds of its rate (at least one request)."""

    retries: int = 1
    """Extra attempts on another replica when a worker is unreachable or answers UNAVAILABLE."""

    eject_s: float = 5.0
    """How long a worker that failed a request is skipped (while another replica of the version can
    take its requests; a version's only usable replica keeps getting them)."""

    default_timeout_s: float = 0.0
    """Upstream timeout for requests that carry no deadline; 0 = none."""

    upstream: Literal["stream", "unary"] = "stream"
    """How ModelInfer reaches workers: "stream" multiplexes requests on one long-lived stream per
    worker (maas.v1.WorkerInference: a message costs both processes much less than a unary call);
    "unary" makes one v2 ModelInfer call per request (for workers that serve only the v2 API)."""

    stream_max_bytes: int = Field(default=1 << 20, ge=0)
    """With `upstream="stream"`: requests whose tensor bytes exceed this take a v2 call of their own, so
    that a large request does not hold up the small ones queued behind it on the shared stream."""

    stream_max_queued: int = Field(default=64, ge=1)
    """ModelStreamInfer: responses held for one client stream that is not reading them. Past it, the
    gateway stops reading that stream's workers, whose own bound then stops them reading requests, and
    HTTP/2 flow control pushes back on the client's writes: a client that never reads costs the mesh a
    bounded amount of memory."""

    coalesce: bool = True
    """Merge concurrent requests for one version into one upstream call (models with max_batch_size > 0)."""

    coalesce_window_ms: float = 0.0
    """Extra wait for more requests before sending a batch; 0 = merge only what queues up while the
    version's upstream calls are busy (no added latency for a lone request)."""

    coalesce_inflight_per_worker: int = Field(default=0, ge=0)
    """Upstream calls per worker a version may have in flight before new requests queue (and merge);
    0 = by the worker's device: 1 on a CPU (its cores compute one batch at a time, so a second call in
    flight only splits what would have merged), 2 on an accelerator (the next batch travels while one
    computes)."""

    public_tls_cert_file: Path | None = None
    """PEM certificate for TLS on the public port (with public_tls_key_file)."""

    public_tls_key_file: Path | None = None
    """PEM private key of public_tls_cert_file."""

    public_tls_client_ca_file: Path | None = None
    """When set, public clients must present a certificate signed by this CA (mTLS on the public port)."""

    uvloop: bool = True
    """Run on uvloop when installed (about 20% less CPU per gRPC call)."""

    server_version: str = "0.1.0"
    """Version string in ServerMetadata."""
