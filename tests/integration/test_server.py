"""gRPC bootstrap: typed errors become status codes, health and reflection answer, stubs coexist."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mesh.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    from_rpc_error,
)
from mesh.server import MAX_REQUEST_ID, REQUEST_ID_KEY, ServiceHost, inflate, open_channel
from mesh.v2 import SERVICE_NAME, pb, pb_grpc


class _Servicer(pb_grpc.GRPCInferenceServiceServicer):
    expired = 0

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        raise NotFound(f"name: model '{request.name}' is not found")

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        raise ZeroDivisionError("a bug")

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        # Like the worker's queue timer: fails the request at its deadline (shifted by `version`
        # microseconds), the moment grpc core ends the call for the same deadline.
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[pb.ModelConfigResponse] = loop.create_future()
        delay = (context.time_remaining() or 0.0) + int(request.version) / 1e6

        def expire() -> None:
            if not failed.done():
                self.expired += 1
                failed.set_exception(DeadlineExceeded("waited in the queue past its deadline"))

        loop.call_later(delay, expire)
        return await failed

    def __init__(self) -> None:
        self.stream_ended = asyncio.Event()

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        try:
            async for req in request_iterator:
                if req.id == "bad":
                    raise InvalidArgument("inputs[0].shape: negative dimension")
                # "flood": far more than HTTP/2 flow control lets through to a client that does not read.
                for _ in range(400 if req.id == "flood" else 1):
                    response = pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(id=req.id))
                    if req.id == "flood":
                        response.infer_response.raw_output_contents.append(bytes(100_000))
                    yield response
        finally:
            self.stream_ended.set()


@pytest.fixture
def servicer() -> _Servicer:
    return _Servicer()


@pytest.fixture
async def host(servicer: _Servicer) -> AsyncIterator[ServiceHost]:
    h = ServiceHost("test")
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, h.server)
    h.add_service(SERVICE_NAME)
    await h.start("127.0.0.1:0")
    yield h
    await h.stop(0)


async def test_errors_map_to_status_codes(host: ServiceHost) -> None:
    async with open_channel(host.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelReady(pb.ModelReadyRequest(name="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in (err.value.details() or "")
        assert isinstance(from_rpc_error(err.value), NotFound)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelMetadata(pb.ModelMetadataRequest(name="x"))
        assert err.value.code() == grpc.StatusCode.INTERNAL and "ZeroDivisionError" in (
            err.value.details() or ""
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelInfer(pb.ModelInferRequest(model_name="x"))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

        async def requests() -> AsyncIterator[pb.ModelInferRequest]:
            yield pb.ModelInferRequest(id="a")
            yield pb.ModelInferRequest(id="bad")

        call = stub.ModelStreamInfer(requests())
        first = await call.read()
        assert first.infer_response.id == "a"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "inputs[0].shape" in (
            err.value.details() or ""
        )
        # The server survived all of it.
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live


async def test_errors_raised_after_the_deadline_are_not_logged(
    host: ServiceHost, servicer: _Servicer, caplog: pytest.LogCaptureFixture
) -> None:
    # A handler failing at the instant its deadline passes must not try to send a status on the call
    # grpc core has just ended: grpc logs that failed send as an ERROR with a traceback, per request.
    caplog.set_level(logging.INFO)
    async with open_channel(host.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def call(shift_us: int) -> None:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ModelConfig(pb.ModelConfigRequest(name="m", version=str(shift_us)), timeout=0.05)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        # The race with core's deadline timer is won a few times in a hundred: shifts spread the handler's
        # failures over a few milliseconds either side of the deadline.
        for _ in range(10):
            await asyncio.gather(*(call(shift) for shift in range(-1500, 3000, 50)))
        await asyncio.sleep(0.2)  # let grpc finish the calls (and log, if it would)
        assert servicer.expired > 0  # handlers did fail around their deadline, not only get cancelled
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert not errors, [r.getMessage() for r in errors[:3]]
        # Live calls keep their status, and the server still answers.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelReady(pb.ModelReadyRequest(name="nope"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert (await stub.ServerLive(pb.ServerLiveRequest(), timeout=5)).live


async def test_health_and_reflection(host: ServiceHost) -> None:
    async with open_channel(host.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names = []
        async for resp in refl.ServerReflectionInfo(ask()):
            names = [s.name for s in resp.list_services_response.service]
        assert SERVICE_NAME in names and "grpc.health.v1.Health" in names
        await host.set_serving(False)
        resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_our_stubs_and_tritonclient_share_one_process() -> None:
    import tritonclient.grpc as tc
    from tritonclient.grpc import service_pb2

    from mesh_pb import common_pb2, compressor_pb2, registry_pb2, router_pb2, worker_pb2

    assert pb.ModelInferRequest is service_pb2.ModelInferRequest
    assert tc.InferInput("x", [1], "FP32") is not None
    packages = {
        m.DESCRIPTOR.package for m in (common_pb2, registry_pb2, router_pb2, worker_pb2, compressor_pb2)
    }
    assert packages == {"maas.v1"}
    assert service_pb2.DESCRIPTOR.package == "inference"


def test_errors_carry_code_and_retryability() -> None:
    assert Unavailable("x").retryable and not InvalidArgument("x").retryable
    assert Unavailable("x", retryable=False).retryable is False
    assert InvalidArgument("f: bad").code == grpc.StatusCode.INVALID_ARGUMENT


async def test_undecodable_requests_and_huge_messages_keep_their_code(host: ServiceHost) -> None:
    async with open_channel(host.address) as channel:
        raw_unary = channel.unary_unary("/inference.GRPCInferenceService/ModelReady")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw_unary(b"\xff\xff\xff")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid request message" in (err.value.details() or "")

        raw_stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")

        async def junk() -> AsyncIterator[bytes]:
            yield b"\x0a\xff"

        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in raw_stream(junk()):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # A message quoting a 20,000-character name is cut, so the client still sees NOT_FOUND.
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelReady(pb.ModelReadyRequest(name="x" * 20_000))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert len(err.value.details() or "") < 2_100
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live


async def test_messages_over_the_limit_are_refused_compressed_or_not(servicer: _Servicer) -> None:
    h = ServiceHost("test", max_message_mb=1)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, h.server)
    await h.start("127.0.0.1:0")
    try:
        request = pb.ModelInferRequest(model_name="m", raw_input_contents=[bytes(2 << 20)])
        async with open_channel(h.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for compression in (None, grpc.Compression.Gzip, grpc.Compression.Deflate):
                # 2 MiB of zeros is about 2 KiB compressed: the server must not inflate it past its limit.
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ModelInfer(request, compression=compression)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, compression
                assert "larger than" in (err.value.details() or "")
                # Under the limit, the request reaches the handler, decompressed: it names the model.
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ModelReady(pb.ModelReadyRequest(name="z" * 500_000), compression=compression)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND, compression
                assert "zzzz" in (err.value.details() or "")
                call = stub.ModelStreamInfer(_one(pb.ModelInferRequest(id="c")), compression=compression)
                assert (await call.read()).infer_response.id == "c"
                call = stub.ModelStreamInfer(_one(request), compression=compression)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call.read()
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, compression
    finally:
        await h.stop(0)


async def test_request_ids_are_bounded(host: ServiceHost) -> None:
    async with open_channel(host.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        ok = await stub.ServerLive(pb.ServerLiveRequest(), metadata=((REQUEST_ID_KEY, "r" * MAX_REQUEST_ID),))
        assert ok.live
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ServerLive(pb.ServerLiveRequest(), metadata=((REQUEST_ID_KEY, "r" * 5_000),))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert REQUEST_ID_KEY in (err.value.details() or "")

        async def one() -> AsyncIterator[pb.ModelInferRequest]:
            yield pb.ModelInferRequest(id="a")

        call = stub.ModelStreamInfer(one(), metadata=((REQUEST_ID_KEY, "r" * 5_000),))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert REQUEST_ID_KEY in (err.value.details() or "")


async def test_a_stream_cancelled_with_responses_unsent_ends_quietly(
    host: ServiceHost, servicer: _Servicer, caplog: pytest.LogCaptureFixture
) -> None:
    # A client that cancels while the server still has responses to send: grpc logged an ERROR with a
    # traceback for every such stream when the handler yielded its responses to grpc.
    caplog.set_level(logging.INFO)
    async with open_channel(host.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            servicer.stream_ended.clear()
            call = stub.ModelStreamInfer()
            await call.write(pb.ModelInferRequest(id="flood"))
            first = await call.read()
            assert first.infer_response.id == "flood"
            call.cancel()
            await asyncio.wait_for(servicer.stream_ended.wait(), 10)  # the handler's cleanup ran
        await asyncio.sleep(0.2)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert not errors, [r.getMessage() for r in errors[:3]]
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live


async def _one(request: pb.ModelInferRequest) -> AsyncIterator[pb.ModelInferRequest]:
    yield request


def test_inflate_takes_only_complete_compressed_messages_and_stops_at_the_limit() -> None:
    import gzip
    import zlib

    body = pb.ModelReadyRequest(name="digits").SerializeToString()
    assert inflate(body, 1 << 20) is body
    assert inflate(gzip.compress(body), 1 << 20) == body
    assert inflate(zlib.compress(body), 1 << 20) == body
    # Bytes that only start like a zlib stream (a varint field 1 of value 29), or are cut short, are
    # left for the protobuf parser to judge.
    frame = bytes([0x08, 29, 0x12, 0x01, 0x41])
    assert inflate(frame, 1 << 20) is frame
    cut = zlib.compress(body)[:-3]
    assert inflate(cut, 1 << 20) is cut
    with pytest.raises(ResourceExhausted):
        inflate(gzip.compress(bytes(5 << 20)), 1 << 20)
