"""Builds and starts a gateway in this process (the composition root shared by __main__ and tests)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.auth import Authenticator
from gateway.ratelimit import RateLimiter
from gateway.service import GatewayService
from gateway.servicer import GatewayServicer
from gateway.settings import GatewaySettings
from mesh.auth import bearer_metadata, is_loopback
from mesh.auth import keys_required as mesh_keys_required
from mesh.errors import from_rpc_error
from mesh.registry import Registry
from mesh.server import ServiceHost, open_channel, server_credentials, start_metrics_server
from mesh.v2 import SERVICE_NAME, pb_grpc
from mesh_pb import router_pb2, router_pb2_grpc
from router.client import RouteWatcher
from router.picker import Picker

log = logging.getLogger(__name__)


def keys_required(settings: GatewaySettings) -> bool | None:
    """True = every call needs a key, False = optional, None = no checks at all."""
    return mesh_keys_required(settings.auth_mode, settings.bind)


@dataclass
class GatewayApp:
    """A running gateway: its address and the parts tests may look at."""

    settings: GatewaySettings
    host: ServiceHost
    service: GatewayService
    picker: Picker
    watcher: RouteWatcher
    registry: Registry | None
    port: int
    address: str
    metrics_port: int | None = None
    _owned: list[Any] = field(default_factory=list)

    async def stop(self, grace_s: float = 2.0) -> None:
        """Ends client streams once their requests are answered, then stops the server: unary calls in
        flight get what is left of `grace_s`."""
        start = time.monotonic()
        await self.service.drain(grace_s)
        await self.host.stop(max(0.0, grace_s - (time.monotonic() - start)))
        await self.watcher.stop()
        await self.service.close()
        for closable in reversed(self._owned):
            await closable.close()


async def start_gateway(settings: GatewaySettings, *, registry: Registry | None = None) -> GatewayApp:
    """Connects the registry (for API keys and the repository index), follows the router's route table,
    and serves the public v2 API on `settings.bind`. Refuses to serve a non-loopback address without
    API keys unless `auth_mode="disabled"` says so explicitly."""
    owned: list[Any] = []
    if registry is None and settings.redis_url:
        registry = await Registry.connect(settings.redis_url, settings.key_prefix)
        owned.append(registry)
    required = keys_required(settings)
    if required and registry is None:
        raise ValueError(
            f"gateway on {settings.bind} needs API keys but has no registry to verify them: set MAAS_REDIS_URL, "
            "bind a loopback address, or set MAAS_GATEWAY_AUTH_MODE=disabled explicitly"
        )
    if required is None and not is_loopback(settings.bind):
        log.warning("API keys are disabled on the non-loopback address %s", settings.bind)
    auth = (
        None
        if required is None
        else Authenticator(
            registry, required=required, ttl_s=settings.auth_cache_ttl_s, stale_s=settings.auth_stale_s
        )
    )
    limiter = RateLimiter(settings.rate_limit_rps, burst_s=settings.rate_limit_burst_s)

    router_channel = open_channel(settings.router_address, settings)
    owned.append(router_channel)
    router_stub = router_pb2_grpc.RouterServiceStub(router_channel)
    router_key = settings.router_api_key.get_secret_value() if settings.router_api_key else None
    router_metadata = bearer_metadata(router_key)

    async def place(request: router_pb2.PlaceRequest, timeout: float) -> router_pb2.PlaceResponse:
        import grpc.aio

        try:
            return await router_stub.Place(request, timeout=timeout, metadata=router_metadata)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    picker = Picker()
    service = GatewayService(settings, picker, auth=auth, limiter=limiter, registry=registry, place=place)
    watcher = RouteWatcher(
        settings.router_address,
        service.on_table,
        subscriber="gateway",
        settings=settings,
        metadata=router_metadata,
    )
    await watcher.start()
    if settings.startup_table_timeout_s > 0:
        try:
            await watcher.wait_for_table(timeout=settings.startup_table_timeout_s)
        except TimeoutError:
            log.warning(
                "no route table from %s yet; serving UNAVAILABLE until one arrives", settings.router_address
            )

    credentials = server_credentials(
        settings.public_tls_cert_file, settings.public_tls_key_file, settings.public_tls_client_ca_file
    )
    # Public credentials only: the mesh's own mTLS settings are for calls between services.
    host = ServiceHost("gateway", None, credentials=credentials, max_message_mb=settings.max_message_mb)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(GatewayServicer(service), host.server)
    host.add_service(SERVICE_NAME)
    try:
        port = await host.start(settings.bind)
    except Exception:
        await watcher.stop()
        await service.close()
        for closable in reversed(owned):
            await closable.close()
        raise
    metrics_port = None
    if settings.metrics_port >= 0:
        metrics_port = start_metrics_server(settings.metrics_port, settings.metrics_addr)
        log.info("gateway metrics on http://%s:%d/metrics", settings.metrics_addr, metrics_port)
    log.info(
        "gateway serving on %s (tls=%s, keys=%s, router=%s, metrics=%s)",
        host.address,
        credentials is not None,
        {None: "disabled", True: "required", False: "optional"}[required],
        settings.router_address,
        metrics_port,
    )
    return GatewayApp(
        settings=settings,
        host=host,
        service=service,
        picker=picker,
        watcher=watcher,
        registry=registry,
        port=port,
        address=host.address,
        metrics_port=metrics_port,
        _owned=owned,
    )
