"""gRPC adapter of maas.v1.CompressorService: decode → call CompressorService → encode."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from compressor.service import CompressorService
from mesh_pb import compressor_pb2, compressor_pb2_grpc

SERVICE_NAME = "maas.v1.CompressorService"


class CompressorServicer(compressor_pb2_grpc.CompressorServiceServicer):
    def __init__(self, service: CompressorService) -> None:
        self.service = service

    async def SubmitJob(
        self, request: compressor_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> compressor_pb2.Job:
        return await self.service.submit(request)

    async def WatchJob(
        self, request: compressor_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[compressor_pb2.JobEvent]:
        async for job in self.service.watch(request.job_id):
            yield compressor_pb2.JobEvent(job=job)

    async def CancelJob(
        self, request: compressor_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> compressor_pb2.Job:
        return await self.service.cancel(request.job_id)

    async def ListJobs(
        self, request: compressor_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> compressor_pb2.ListJobsResponse:
        return compressor_pb2.ListJobsResponse(jobs=await self.service.list_jobs(request.limit))

    async def GetJob(
        self, request: compressor_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> compressor_pb2.Job:
        return await self.service.get(request.job_id)
