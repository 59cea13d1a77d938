"""gRPC servicers of the router: RouterService (route watch, placement) and the registry admin API."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc.aio

from mesh.registry import Registry
from mesh_pb import common_pb2, registry_pb2, registry_pb2_grpc, router_pb2, router_pb2_grpc
from router.service import RouterService


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    """Decode, call RouterService, encode."""

    def __init__(self, service: RouterService) -> None:
        self.service = service

    async def WatchRoutes(  # type: ignore[override]
        self, request: router_pb2.WatchRoutesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.RouteTable]:
        async for table in self.service.watch(request.subscriber or context.peer()):
            yield table

    async def Place(  # type: ignore[override]
        self, request: router_pb2.PlaceRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.PlaceResponse:
        workers = await self.service.place(request.ref.name, request.ref.version, request.unload)
        return router_pb2.PlaceResponse(worker_ids=workers)


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    """The registry admin API as a thin layer over mesh.registry.Registry."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def RegisterVersion(  # type: ignore[override]
        self, request: registry_pb2.RegisterVersionRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelVersion:
        return await self.registry.register_version(request)

    async def GetVersion(  # type: ignore[override]
        self, request: common_pb2.ModelRef, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelVersion:
        return await self.registry.get_version(request.name, request.version)

    async def ListModels(  # type: ignore[override]
        self, request: registry_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListModelsResponse:
        models = await self.registry.list_models(include_versions=request.include_versions)
        return registry_pb2.ListModelsResponse(models=models)

    async def SetVersionState(  # type: ignore[override]
        self, request: registry_pb2.SetVersionStateRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelVersion:
        return await self.registry.set_state(
            request.ref.name, request.ref.version, request.state, request.reason
        )

    async def SetAlias(  # type: ignore[override]
        self, request: registry_pb2.SetAliasRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Model:
        return await self.registry.set_alias(request.model, request.alias, request.version)

    async def SetTraffic(  # type: ignore[override]
        self, request: registry_pb2.SetTrafficRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Model:
        return await self.registry.set_traffic(request.model, list(request.traffic))

    async def CreateApiKey(  # type: ignore[override]
        self, request: registry_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.CreateApiKeyResponse:
        key_id, token = await self.registry.create_api_key(
            request.name, request.role or registry_pb2.INFER, list(request.models), request.rate_limit_rps
        )
        return registry_pb2.CreateApiKeyResponse(key_id=key_id, token=token)

    async def RevokeApiKey(  # type: ignore[override]
        self, request: registry_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.RevokeApiKeyResponse:
        return registry_pb2.RevokeApiKeyResponse(revoked=await self.registry.revoke_api_key(request.key_id))

    async def WatchEvents(  # type: ignore[override]
        self, request: registry_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[registry_pb2.RegistryEvent]:
        async for event in self.registry.watch_events(request.after_id or "$"):
            yield event
