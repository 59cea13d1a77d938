"""Builds a running router (registry client, service, gRPC host) in this process: for __main__ and tests."""

from __future__ import annotations

import logging

import redis.asyncio as aioredis

from mesh.auth import ApiKeyInterceptor, Authenticator, Need, is_loopback, keys_required
from mesh.redis_embed import EmbeddedRedis
from mesh.registry import Registry
from mesh.server import ServiceHost
from mesh_pb import registry_pb2, registry_pb2_grpc, router_pb2, router_pb2_grpc
from router.service import RouterService
from router.servicer import RegistryServicer, RouterServicer
from router.settings import RouterSettings

log = logging.getLogger(__name__)

ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
REGISTRY_SERVICE = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name
# What each RPC asks of the caller's key when keys are checked: the registry admin API and placement
# change the mesh (and CreateApiKey mints keys), so they need the admin role; gateways follow the route
# table with any valid key. RPCs added to either service later need the admin role by default.
KEY_RULES: dict[str, Need] = {
    f"/{REGISTRY_SERVICE}/": "admin",
    f"/{ROUTER_SERVICE}/": "admin",
    f"/{ROUTER_SERVICE}/WatchRoutes": "any",
}


class RouterApp:
    """A started router: `.address` to connect to, `.service` for its state, `await .stop()`."""

    def __init__(
        self,
        settings: RouterSettings,
        host: ServiceHost,
        service: RouterService,
        registry: Registry,
        embedded: EmbeddedRedis | None,
    ) -> None:
        self.settings = settings
        self.host = host
        self.service = service
        self.registry = registry
        self._embedded = embedded

    @property
    def address(self) -> str:
        return self.host.address

    @property
    def port(self) -> int:
        return self.host.port

    async def refresh(self) -> None:
        """Rebuilds and publishes the table now instead of at the next poll."""
        await self.service.refresh(models=True)

    async def stop(self, grace_s: float | None = None) -> None:
        await self.host.set_serving(False)
        await self.service.stop()
        await self.host.stop(self.settings.stop_grace_s if grace_s is None else grace_s)
        await self.registry.close()
        if self._embedded is not None:
            self._embedded.stop()


async def start_router(settings: RouterSettings, *, bind: str | None = None) -> RouterApp:
    """Starts the router's gRPC server on `bind` (default settings.bind; "127.0.0.1:0" picks a port).
    Checks API keys as `settings.auth_mode` says for that address (see KEY_RULES)."""
    bind = bind or settings.bind
    required = keys_required(settings.auth_mode, bind)
    if required is None and not is_loopback(bind):
        log.warning("API keys are disabled on the router's non-loopback address %s", bind)
    embedded = None
    url = settings.redis_url
    if url is None:
        embedded = EmbeddedRedis(settings.var_dir / "redis")
        url = embedded.start()
        log.info("no MAAS_REDIS_URL: started an embedded registry server at %s", url)
    # No ping here: a router that starts while Redis is down serves nothing until Redis answers, and its
    # loops keep retrying (gateways keep their last table meanwhile).
    registry = Registry(aioredis.Redis.from_url(url), settings.key_prefix)
    service = RouterService(settings, registry)
    interceptors: list[ApiKeyInterceptor] = []
    if required is not None:
        interceptors.append(ApiKeyInterceptor(Authenticator(registry, required=required), KEY_RULES))
    host = ServiceHost("router", settings, interceptors=interceptors)
    router_pb2_grpc.add_RouterServiceServicer_to_server(RouterServicer(service), host.server)
    host.add_service(ROUTER_SERVICE)
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(registry), host.server)
    host.add_service(REGISTRY_SERVICE)
    try:
        await service.start()
        await host.start(bind)
    except BaseException:
        await service.stop()
        await registry.close()
        if embedded is not None:
            embedded.stop()
        raise
    log.info(
        "router API keys on %s: %s",
        host.address,
        {None: "disabled", True: "required", False: "optional"}[required],
    )
    return RouterApp(settings, host, service, registry, embedded)
