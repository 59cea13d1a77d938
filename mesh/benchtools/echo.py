"""A bare grpc.aio KServe v2 server that echoes its inputs: the floor a worker's latency is measured against.

No interceptors, no batching, no model: ModelInfer copies each input to an output of the same name,
shape and datatype. It answers the metadata calls tritonclient and perf_analyzer make for any model name.
Run as ``python -m mesh.benchtools.echo --bind 127.0.0.1:0``; it prints ``PORT <n>`` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import grpc
import grpc.aio

from mesh.server import GRPC_OPTIONS, install_uvloop
from mesh.v2 import config_pb, pb, pb_grpc

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
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version or "1", id=request.id
        )
        for tensor in request.inputs:
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.extend(request.raw_input_contents)
        return response


async def serve(bind: str) -> None:
    server = grpc.aio.server(options=GRPC_OPTIONS)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(EchoServicer(), server)
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
    args = parser.parse_args(argv)
    if not args.no_uvloop:
        install_uvloop()
    asyncio.run(serve(args.bind))
    return 0


if __name__ == "__main__":
    sys.exit(main())
