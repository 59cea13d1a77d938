"""Router settings, read from MAAS_ROUTER_* environment variables (plus the common MAAS_* fields)."""

from __future__ import annotations

from typing import Literal

from pydantic_settings import SettingsConfigDict

from mesh.settings import MeshSettings


class RouterSettings(MeshSettings):
    """Where the router listens, how often it rebuilds and publishes the table, and placement policy."""

    model_config = SettingsConfigDict(env_prefix="MAAS_ROUTER_", extra="ignore", populate_by_name=True)

    bind: str = "127.0.0.1:8101"
    """host:port of the router's gRPC server (RouterService, RegistryService, health)."""

    auth_mode: Literal["auto", "required", "optional", "disabled"] = "auto"
    """API keys on RegistryService and RouterService (health and reflection stay open): "auto" =
    required when `bind` is not a loopback address, optional on loopback; "required"; "optional" (a key
    that is sent must be valid); "disabled" (no checks, even on a public address: an explicit opt-out).
    RegistryService and Place need the admin role; WatchRoutes takes any valid key (gateways send
    MAAS_GATEWAY_ROUTER_API_KEY)."""

    metrics_port: int = 0
    """Port of the Prometheus metrics HTTP server; 0 = no metrics server."""

    publish_interval_s: float = 2.0
    """Longest time between two tables sent to a subscriber, even when nothing changed."""

    debounce_s: float = 0.05
    """Registry events arriving within this window are coalesced into one rebuild."""

    poll_interval_s: float = 0.5
    """How often worker heartbeats (liveness, loaded versions, queue depths) are read."""

    models_refresh_s: float = 2.0
    """How often models are re-read even without registry events (in case an event was missed)."""

    placement: bool = True
    """Place versions on workers (load/unload); false = only publish the table."""

    placement_interval_s: float = 1.0
    """Longest time between two placement passes (a change in the registry or workers runs one sooner)."""

    default_min_replicas: int = 1
    """Replicas of a version whose min_replicas is 0."""

    scale_queue_depth: int = 8
    """Mean queue depth per replica above which a version gets one more replica (up to max_replicas)."""

    scale_after_s: float = 5.0
    """The queue depth must stay above scale_queue_depth this long before a replica is added."""

    scale_down_after_s: float = 120.0
    """An extra replica (above min_replicas) is unloaded once its version saw no queue this long and
    the replica itself served no request this long (a fast model that never queues is not idle)."""

    memory_pressure: float = 0.9
    """Fraction of a worker's memory budget above which the router unloads its coldest extra replicas."""

    load_timeout_s: float = 120.0
    """Longest wait for one worker's LoadVersion call."""

    unload_grace_s: float = 3.0
    """A version is unloaded from a worker only this long after the first route table that no longer
    routes it there was published: gateways get each table a moment after it is built, and one still
    on the older table would send requests to a worker that stopped serving the version (NOT_FOUND).
    Applies to retired versions, extra replicas, memory-pressure evictions and Place(unload)."""

    load_grace_s: float = 10.0
    """After a load/unload, trust the call's result this long even if heartbeats do not show it yet."""

    retry_failed_load_s: float = 10.0
    """Wait before retrying a load that failed for a transient reason (worker unavailable)."""

    registry_recovery_grace_s: float = 5.0
    """After a registry outage, workers it no longer lists keep their last known endpoints this long
    (their heartbeat keys expired or were lost with the outage and are being rewritten). A router that
    just started knows no workers yet: its first table waits up to this long after the registry first
    answers, until heartbeats show an endpoint for every READY version (gateways keep their last table
    meanwhile rather than install one that routes nowhere)."""

    stop_grace_s: float = 2.0
    """Grace period for in-flight RPCs when the router stops."""
