"""The public KServe v2 GRPCInferenceService: decode the call, ask GatewayService, encode the answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc.aio

from gateway.service import GatewayService
from mesh.errors import Unimplemented
from mesh.v2 import pb, pb_grpc

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class GatewayServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Every RPC tritonclient and perf_analyzer use; shared memory, trace and log settings answer UNIMPLEMENTED."""

    def __init__(self, service: GatewayService) -> None:
        self.service = service

    async def ServerLive(self, request: Any, context: Context) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Context) -> Any:
        return pb.ServerReadyResponse(ready=self.service.server_ready())

    async def ServerMetadata(self, request: Any, context: Context) -> Any:
        return self.service.server_metadata()

    async def ModelReady(self, request: Any, context: Context) -> Any:
        ready = await self.service.model_ready(request.name, request.version, context.invocation_metadata())
        return pb.ModelReadyResponse(ready=ready)

    async def ModelMetadata(self, request: Any, context: Context) -> Any:
        return await self.service.model_metadata(request.name, request.version, context.invocation_metadata())

    async def ModelConfig(self, request: Any, context: Context) -> Any:
        return await self.service.model_config(request.name, request.version, context.invocation_metadata())

    async def ModelStatistics(self, request: Any, context: Context) -> Any:
        return await self.service.model_statistics(
            request.name, request.version, context.invocation_metadata()
        )

    async def ModelInfer(self, request: Any, context: Context) -> Any:
        return await self.service.infer(request, context.invocation_metadata(), context.time_remaining())

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: Context
    ) -> AsyncIterator[Any]:
        async for response in self.service.stream_infer(
            request_iterator, context.invocation_metadata(), context.time_remaining()
        ):
            yield response

    async def RepositoryIndex(self, request: Any, context: Context) -> Any:
        return await self.service.repository_index(request.ready, context.invocation_metadata())

    async def RepositoryModelLoad(self, request: Any, context: Context) -> Any:
        await self.service.repository_load(request, context.invocation_metadata())
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: Context) -> Any:
        await self.service.repository_unload(request, context.invocation_metadata())
        return pb.RepositoryModelUnloadResponse()

    # Not served: data never lives in shared memory here, and tracing/logging are set by environment.
    async def SystemSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        raise Unimplemented("SystemSharedMemoryStatus: shared memory is not supported")

    async def SystemSharedMemoryRegister(self, request: Any, context: Context) -> Any:
        raise Unimplemented("SystemSharedMemoryRegister: shared memory is not supported")

    async def SystemSharedMemoryUnregister(self, request: Any, context: Context) -> Any:
        raise Unimplemented("SystemSharedMemoryUnregister: shared memory is not supported")

    async def CudaSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        raise Unimplemented("CudaSharedMemoryStatus: shared memory is not supported")

    async def CudaSharedMemoryRegister(self, request: Any, context: Context) -> Any:
        raise Unimplemented("CudaSharedMemoryRegister: shared memory is not supported")

    async def CudaSharedMemoryUnregister(self, request: Any, context: Context) -> Any:
        raise Unimplemented("CudaSharedMemoryUnregister: shared memory is not supported")

    async def TraceSetting(self, request: Any, context: Context) -> Any:
        raise Unimplemented("TraceSetting: tracing is not supported")

    async def LogSettings(self, request: Any, context: Context) -> Any:
        raise Unimplemented("LogSettings: set MAAS_LOG_LEVEL instead")
