"""A bare grpc.aio KServe v2 server that echoes its inputs: the floor a worker's latency is measured against.

No interceptors, no batching, no model: ModelInfer copies each input to an output of the same name,
shape and datatype. It answers the metadata calls tritonclient and perf_analyzer make for any model name.
Run as ``python -m mesh.benchtools.echo --bind 127.0.0.1:0``; it prints ``PORT <n>`` once it listens.
It also serves the mesh's multiplexed data path (maas.v1.WorkerInference), and with ``--proxy HOST:PORT``
it becomes a bare proxy in front of another echo: the floor of what one Python gRPC hop costs.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator

import grpc
import grpc.aio

from mesh.server import GRPC_OPTIONS, install_uvloop
from mesh.v2 import config_pb, pb, pb_grpc
from mesh_pb import worker_pb2, worker_pb2_grpc

ECHO_INPUT = "pixels"
ECHO_SHAPE = (-1, 64)


class EchoServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Answers every model name as a one-input FP32 echo model."""

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="echo", version="1", extensions=[])

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        tensor = pb.ModelMetadataResponse.TensorMetadata(
            name=ECHO_INPUT, datatype="FP32", shape=list(ECHO_SHAPE)
        )
        return pb.ModelMetadataResponse(
            name=request.name, versions=["1"], platform="echo", inputs=[tensor], outputs=[tensor]
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        tensor_in = config_pb.ModelInput(name=ECHO_INPUT, data_type=config_pb.TYPE_FP32, dims=[ECHO_SHAPE[1]])
        tensor_out = config_pb.ModelOutput(
            name=ECHO_INPUT, data_type=config_pb.TYPE_FP32, dims=[ECHO_SHAPE[1]]
        )
        config = config_pb.ModelConfig(
            name=request.name, platform="echo", max_batch_size=64, input=[tensor_in], output=[tensor_out]
        )
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        stats = pb.ModelStatistics(name=request.name or "echo", version=request.version or "1")
        return pb.ModelStatisticsResponse(model_stats=[stats])

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return _echo_response(request)


def _echo_response(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version or "1", id=request.id
    )
    for tensor in request.inputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    response.raw_output_contents.extend(request.raw_input_contents)
    return response


class EchoFrames(worker_pb2_grpc.WorkerInferenceServicer):
    """The mesh's multiplexed data path (maas.v1.WorkerInference), echoing each frame's request."""

    async def Infer(
        self, request_iterator: AsyncIterator[worker_pb2.InferFrame], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.InferResult]:
        async for frame in request_iterator:
            if frame.cancel:
                continue
            response = _echo_response(pb.ModelInferRequest.FromString(frame.request))
            yield worker_pb2.InferResult(tag=frame.tag, response=response.SerializeToString())


class ProxyServicer(EchoServicer):
    """A bare proxy: ModelInfer goes to an upstream echo, with no validation, routing or metrics (the
    rest is answered locally). What one Python gRPC hop costs by itself, with one v2 call per request
    ("unary") or with requests multiplexed on one stream per upstream ("stream", as the gateway does)."""

    def __init__(self, upstream: str, mode: str) -> None:
        from gateway.upstream import WorkerLink

        channel = grpc.aio.insecure_channel(upstream, options=GRPC_OPTIONS)
        self._stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self._link = WorkerLink(channel, upstream) if mode == "stream" else None

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        if self._link is None:
            return await self._stub.ModelInfer(request)
        data = await self._link.infer(request.SerializeToString(), None, "")
        return pb.ModelInferResponse.FromString(data)


async def serve(bind: str, proxy: str = "", upstream_mode: str = "stream") -> None:
    server = grpc.aio.server(options=GRPC_OPTIONS)
    servicer = ProxyServicer(proxy, upstream_mode) if proxy else EchoServicer()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    worker_pb2_grpc.add_WorkerInferenceServicer_to_server(EchoFrames(), server)
    port = server.add_insecure_port(bind)
    await server.start()
    print(f"PORT {port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bind", default="127.0.0.1:0")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    parser.add_argument("--proxy", default="", help="forward ModelInfer to this echo (host:port) instead")
    parser.add_argument("--upstream", choices=("stream", "unary"), default="stream", help="with --proxy")
    args = parser.parse_args(argv)
    if not args.no_uvloop:
        install_uvloop()
    asyncio.run(serve(args.bind, args.proxy, args.upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
