"""Builds a running compressor (registry, store, service, gRPC host) for `__main__` and for tests."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis.asyncio as aioredis

from compressor.service import CompressorService
from compressor.servicer import SERVICE_NAME, CompressorServicer
from compressor.settings import CompressorSettings
from mesh.redis_embed import EmbeddedRedis
from mesh.registry import Registry
from mesh.server import ServiceHost
from mesh.store import ArtifactStore
from mesh_pb import compressor_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class CompressorApp:
    host: ServiceHost
    service: CompressorService
    registry: Registry
    embedded: EmbeddedRedis | None = None

    @property
    def address(self) -> str:
        return self.host.address

    @property
    def port(self) -> int:
        return self.host.port

    async def stop(self, grace_s: float | None = None) -> None:
        await self.host.set_serving(False)
        await self.service.stop()
        await self.host.stop(grace_s if grace_s is not None else self.service.settings.grace_s)
        await self.registry.close()
        if self.embedded is not None:
            self.embedded.stop()


async def start_compressor(
    settings: CompressorSettings, *, bind: str | None = None, consumer: str | None = None
) -> CompressorApp:
    """Connects to the registry (an embedded server when MAAS_REDIS_URL is unset), starts serving and,
    unless run_jobs is false, taking jobs."""
    embedded = None
    url = settings.redis_url
    if not url:
        embedded = EmbeddedRedis(settings.var_dir / "redis")
        url = embedded.start()
    registry = Registry(aioredis.Redis.from_url(url), settings.key_prefix)
    await registry.redis.ping()
    service = CompressorService(registry, ArtifactStore(settings.store_dir), settings, consumer=consumer)
    host = ServiceHost("compressor", settings)
    compressor_pb2_grpc.add_CompressorServiceServicer_to_server(CompressorServicer(service), host.server)
    host.add_service(SERVICE_NAME)
    await service.start()
    await host.start(bind or settings.bind)
    return CompressorApp(host=host, service=service, registry=registry, embedded=embedded)
