"""KServe v2 GRPCInferenceService of a worker: decode -> ModelManager -> encode."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from mesh import codec
from mesh.codec import COALESCED_REQUESTS, MAX_COALESCED_REQUESTS
from mesh.errors import Internal, InvalidArgument, MeshError, ModelNotFound, NotFound
from mesh.logging import request_id_var
from mesh.server import bounded_message, grpc_error_mode
from mesh.v2 import config_pb, pb, pb_grpc
from mesh_pb import common_pb2, worker_pb2, worker_pb2_grpc
from workers.batcher import Duration, VersionStats
from workers.service import ModelManager, ServedVersion

log = logging.getLogger(__name__)

SERVER_NAME = "maas-worker"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["model_repository", "model_repository(unload_dependents)", "model_configuration", "statistics"]

PLATFORMS = {
    "torch_export": "pytorch",
    "pt2": "pytorch",
    "module_state": "pytorch",
    "tinylm": "pytorch",
    "torchscript": "pytorch_libtorch",
    "onnx": "onnxruntime_onnx",
}
BACKENDS = {"onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch", "pytorch": "pytorch"}

FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"
_END = object()


def _deadline(request: pb.ModelInferRequest, remaining: float | None) -> float | None:
    """Loop-time deadline: `remaining` seconds (the call's deadline) or the `timeout` request parameter
    (µs), whichever is first."""
    if "timeout" in request.parameters:
        param = request.parameters["timeout"]
        which = param.WhichOneof("parameter_choice")
        if which not in ("int64_param", "uint64_param"):
            raise InvalidArgument("parameters['timeout']: must be an integer number of microseconds")
        us = getattr(param, which)
        if us > 0:
            remaining = us / 1e6 if remaining is None else min(remaining, us / 1e6)
    if remaining is None:
        return None
    return asyncio.get_running_loop().time() + remaining


def _select_outputs(
    sv: ServedVersion, request: pb.ModelInferRequest, outputs: dict[str, Any]
) -> list[tuple[str, Any, str | None]]:
    types = sv.runtime.output_types
    if not request.outputs:
        return [(name, arr, types.get(name)) for name, arr in outputs.items()]
    selected = []
    for i, wanted in enumerate(request.outputs):
        if wanted.name not in outputs:
            raise InvalidArgument(
                f"outputs[{i}].name: unknown output {wanted.name!r}; the model's outputs are "
                + ", ".join(repr(n) for n in outputs)
            )
        selected.append((wanted.name, outputs[wanted.name], types.get(wanted.name)))
    return selected


def _decode(sv: ServedVersion, request: pb.ModelInferRequest) -> dict[str, Any]:
    codec.validate_request(request, sv.input_specs, sv.max_batch_size)
    return codec.decode_validated_request(request)


def _response(sv: ServedVersion, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    return pb.ModelInferResponse(model_name=sv.name, model_version=sv.version_str, id=request.id)


def _duration(msg: Any, d: Duration) -> None:
    msg.count = d.count
    msg.ns = d.ns


def statistics_proto(sv: ServedVersion) -> pb.ModelStatistics:
    st: VersionStats = sv.stats
    out = pb.ModelStatistics(
        name=sv.name,
        version=sv.version_str,
        last_inference=st.last_inference_ms,
        inference_count=st.inference_count,
        execution_count=st.execution_count,
    )
    inf = out.inference_stats
    for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        _duration(getattr(inf, field), getattr(st, field))
    for size in sorted(st.batches):
        bs = st.batches[size]
        b = out.batch_stats.add(batch_size=size)
        _duration(b.compute_input, bs.compute_input)
        _duration(b.compute_infer, bs.compute_infer)
        _duration(b.compute_output, bs.compute_output)
    device = sv.runtime.device
    out.memory_usage.add(
        type="GPU" if device.type == "cuda" else "CPU", id=device.index or 0, byte_size=sv.memory_bytes
    )
    return out


def _data_type(datatype: str) -> int:
    name = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
    try:
        return int(config_pb.DataType.Value(name))
    except ValueError:
        return int(config_pb.DataType.TYPE_INVALID)


def _dims(spec: common_pb2.TensorSpec, batching: bool) -> list[int]:
    dims = list(spec.shape)
    return dims[1:] if batching and dims else dims


def config_proto(sv: ServedVersion, all_versions: list[int]) -> config_pb.ModelConfig:
    rec = sv.record
    sig = rec.signature
    platform = PLATFORMS.get(rec.format.lower(), "pytorch")
    batching = sig.max_batch_size > 0
    cfg = config_pb.ModelConfig(
        name=sv.name,
        platform=platform,
        backend=BACKENDS.get(platform, "pytorch"),
        max_batch_size=max(0, sig.max_batch_size),
    )
    cfg.version_policy.specific.versions.extend(all_versions)
    for spec in sig.inputs:
        cfg.input.add(
            name=spec.name,
            data_type=_data_type(spec.datatype),
            dims=_dims(spec, batching),
            optional=spec.optional,
        )
    for spec in sig.outputs:
        cfg.output.add(name=spec.name, data_type=_data_type(spec.datatype), dims=_dims(spec, batching))
    b = rec.batching
    if b.enabled and batching and not sig.decoupled:
        db = cfg.dynamic_batching
        db.preferred_batch_size.extend(b.preferred_batch_sizes)
        db.max_queue_delay_microseconds = b.max_queue_delay_us
        db.default_queue_policy.max_queue_size = b.max_queue_size
        db.default_queue_policy.allow_timeout_override = True
    cfg.model_transaction_policy.decoupled = sig.decoupled
    device = sv.runtime.device
    group = cfg.instance_group.add(name=f"{sv.name}_0", count=1)
    if device.type == "cuda":
        group.kind = config_pb.ModelInstanceGroup.KIND_GPU
        group.gpus.append(device.index or 0)
    else:
        group.kind = config_pb.ModelInstanceGroup.KIND_CPU
    cfg.parameters["format"].string_value = rec.format
    cfg.parameters["dtype"].string_value = rec.dtype or "fp32"
    return cfg


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The v2 protocol over a ModelManager; RPCs not overridden here answer UNIMPLEMENTED."""

    def __init__(
        self,
        manager: ModelManager,
        *,
        load_model: Callable[[str], Any] | None = None,
        stream_max_in_flight: int = 64,
    ) -> None:
        self.manager = manager
        self._load_model = load_model
        self.stream_max_in_flight = stream_max_in_flight

    # -- health / metadata -------------------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=not self.manager.draining)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            self.manager.resolve(request.name, request.version)
        except InvalidArgument:
            raise  # an unparseable version is the caller's error, as on the gateway and in Triton
        except MeshError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        sv = self.manager.get(request.name, request.version)
        sig = sv.record.signature
        out = pb.ModelMetadataResponse(
            name=sv.name,
            versions=[v.version_str for v in self.manager.model_versions(sv.name)],
            platform=PLATFORMS.get(sv.record.format.lower(), "pytorch"),
        )
        for spec in sig.inputs:
            out.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        for spec in sig.outputs:
            out.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        return out

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        sv = self.manager.get(request.name, request.version)
        versions = [v.version for v in self.manager.model_versions(sv.name)]
        return pb.ModelConfigResponse(config=config_proto(sv, versions))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            if request.version:
                selected = [self.manager.get(request.name, request.version)]
            else:
                selected = self.manager.model_versions(request.name)
                if not selected:
                    raise ModelNotFound(request.name)
        else:
            selected = sorted(self.manager.versions(), key=lambda sv: (sv.name, sv.version))
        return pb.ModelStatisticsResponse(model_stats=[statistics_proto(sv) for sv in selected])

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        out = pb.RepositoryIndexResponse()
        for sv in sorted(self.manager.versions(), key=lambda sv: (sv.name, sv.version)):
            out.models.add(name=sv.name, version=sv.version_str, state="READY")
        if not request.ready:
            for (name, version), reason in sorted(self.manager.failures.items()):
                out.models.add(name=name, version=str(version), state="UNAVAILABLE", reason=reason)
        return out

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        if not request.model_name:
            raise InvalidArgument("model_name: empty")
        for key in request.parameters:
            raise InvalidArgument(
                f"parameters[{key!r}]: unrecognized load parameter (config overrides are not served)"
            )
        if self._load_model is None:
            raise NotFound(f"model_name: this worker has no registry to load {request.model_name!r} from")
        await self._load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        if not request.model_name:
            raise InvalidArgument("model_name: empty")
        for key, value in request.parameters.items():
            if key != "unload_dependents" or value.WhichOneof("parameter_choice") != "bool_param":
                raise InvalidArgument(f"parameters[{key!r}]: unrecognized unload parameter")
        if not await self.manager.unload_model(request.model_name):
            raise ModelNotFound(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- inference ---------------------------------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self.infer(request, context.time_remaining())

    def runs_now(self, request: pb.ModelInferRequest) -> bool:
        """Whether `infer(request)` would answer without waiting (its version's batcher idle and able to
        compute inline, or the request refused at once), so a caller may await it holding nothing up."""
        try:
            sv = self.manager.resolve(request.model_name, request.model_version)
        except MeshError:
            return True
        return sv.batcher.runs_now

    async def infer(self, request: pb.ModelInferRequest, remaining: float | None) -> pb.ModelInferResponse:
        """One unary request, from ModelInfer or from the gateway's multiplexed stream."""
        manager = self.manager
        sv = manager.resolve(request.model_name, request.model_version)
        try:
            inputs = _decode(sv, request)
            deadline = _deadline(request, remaining)
        except MeshError:
            manager.count_failure(sv, time.monotonic_ns())
            raise
        params = request.parameters
        requests = 1
        if params and COALESCED_REQUESTS in params:
            requests = min(max(1, params[COALESCED_REQUESTS].int64_param), MAX_COALESCED_REQUESTS)
        outputs = await manager.infer(sv, inputs, deadline, codec.request_priority(request), requests)
        return codec.encode_response(_response(sv, request), _select_outputs(sv, request, outputs))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently; responses leave as they are ready; the stream ends after the client
        half-closes and every request it sent has answered. With the `triton_grpc_error: true` header the
        first failed request ends the stream with its status code instead of an error_message response.

        A stream holds at most `stream_max_in_flight` requests, each from the moment it is read until its
        last response has left for the client, and as many responses waiting for the client: at the bound
        the stream is not read (HTTP/2 flow control holds the client back) and a request with a response
        to queue waits (a decoupled model's generation pauses), so a client that stops reading costs the
        worker a bounded amount of memory."""
        limit = self.stream_max_in_flight
        slots = asyncio.Semaphore(limit)
        # (item, last): `last` marks a request's final response (or its error), whose leaving frees its slot.
        queue: asyncio.Queue[tuple[Any, bool]] = asyncio.Queue(limit)
        tasks: set[asyncio.Task[None]] = set()
        grpc_error = grpc_error_mode(context.invocation_metadata())

        async def send(item: Any, last: bool) -> None:
            await queue.put((item, last))

        async def read() -> None:
            requests = aiter(request_iterator)
            try:
                while True:
                    await slots.acquire()
                    try:
                        request = await anext(requests)
                    except StopAsyncIteration:
                        break
                    task = asyncio.create_task(
                        self._stream_one(request, send, grpc_error, context.time_remaining())
                    )
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the transport broke: end the stream with that error
                await queue.put((exc, False))
                return
            await queue.put((_END, False))

        reader = asyncio.create_task(read())
        try:
            while True:
                item, last = await queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if last:
                    slots.release()
                yield item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _stream_one(
        self,
        request: pb.ModelInferRequest,
        send: Callable[[Any, bool], Awaitable[None]],
        grpc_error: bool,
        remaining: float | None,
    ) -> None:
        """One request of a ModelStreamInfer stream: sends its responses, the last one marked as such (an
        error included); `remaining` is the stream's time left (its gRPC deadline), if it has one."""
        sv: ServedVersion | None = None
        try:
            sv = self.manager.resolve(request.model_name, request.model_version)
            empty_final = False
            if EMPTY_FINAL in request.parameters:
                empty_final = request.parameters[EMPTY_FINAL].bool_param
            try:
                inputs = _decode(sv, request)
                deadline = _deadline(request, remaining)
            except MeshError:
                self.manager.count_failure(sv, time.monotonic_ns())
                raise
            if not sv.decoupled:
                outputs = await self.manager.infer(sv, inputs, deadline, codec.request_priority(request))
                resp = codec.encode_response(_response(sv, request), _select_outputs(sv, request, outputs))
                resp.parameters[FINAL].bool_param = True
                await send(pb.ModelStreamInferResponse(infer_response=resp), True)
                return
            held: pb.ModelInferResponse | None = None
            async with contextlib.aclosing(self.manager.generate(sv, inputs, deadline)) as generation:
                async for outputs in generation:
                    resp = codec.encode_response(
                        _response(sv, request), _select_outputs(sv, request, outputs)
                    )
                    if empty_final:
                        resp.parameters[FINAL].bool_param = False
                        await send(pb.ModelStreamInferResponse(infer_response=resp), False)
                        continue
                    # Hold one response back so the last data response can carry the final flag.
                    if held is not None:
                        held.parameters[FINAL].bool_param = False
                        await send(pb.ModelStreamInferResponse(infer_response=held), False)
                    held = resp
            if held is None:
                held = _response(sv, request)
            held.parameters[FINAL].bool_param = True
            await send(pb.ModelStreamInferResponse(infer_response=held), True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, MeshError):
                message = exc.message
            else:
                log.error("stream request %r failed", request.id, exc_info=exc)
                message = f"internal error: {type(exc).__name__}: {exc}"
            if grpc_error:  # ends the stream with this status (the output loop raises it)
                await send(exc if isinstance(exc, MeshError) else Internal(message), True)
                return
            err = pb.ModelInferResponse(id=request.id, model_name=request.model_name)
            if sv is not None:
                err.model_version = sv.version_str
            await send(pb.ModelStreamInferResponse(error_message=message, infer_response=err), True)


class WorkerInferenceServicer(worker_pb2_grpc.WorkerInferenceServicer):
    """The gateway's multiplexed data path: each frame is one ModelInfer request, run concurrently with
    the others (so they batch together); each result goes back tagged as soon as it is ready. With
    `max_in_flight` frames running, the stream is not read until one has answered.

    A frame that its version can compute at once (idle batcher, cheap model: the batcher's inline path)
    is answered right in the read loop, with no task and no hand-off; the others run as tasks, so the
    read loop keeps taking frames while they wait in the batcher's queue."""

    def __init__(self, inference: InferenceServicer, max_in_flight: int = 1024) -> None:
        self.inference = inference
        self.max_in_flight = max_in_flight
        self._streams: set[grpc.aio.ServicerContext] = set()

    async def close_streams(self) -> None:
        """Ends every open stream with UNAVAILABLE (after a drain): requests still running get no
        answer, so the gateway retries them elsewhere; new requests open a stream to another worker."""
        for context in list(self._streams):
            with contextlib.suppress(Exception):  # AbortError is how abort() returns; a dead call is fine
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, "worker is draining: retry on another worker"
                )

    async def _answer(
        self, frame: worker_pb2.InferFrame, request: pb.ModelInferRequest | None
    ) -> worker_pb2.InferResult:
        tag = frame.tag
        request_id_var.set(frame.request_id)
        try:
            if request is None:
                raise InvalidArgument("request: not a valid ModelInferRequest")
            response = await self.inference.infer(
                request, frame.timeout_us / 1e6 if frame.timeout_us else None
            )
            return worker_pb2.InferResult(tag=tag, response=response.SerializeToString())
        except MeshError as exc:
            return worker_pb2.InferResult(
                tag=tag, code=exc.code.value[0], message=bounded_message(exc.message)
            )
        except Exception as exc:
            log.error("request %r failed", frame.request_id, exc_info=exc)
            return worker_pb2.InferResult(
                tag=tag,
                code=grpc.StatusCode.INTERNAL.value[0],
                message=f"internal error in ModelInfer: {type(exc).__name__}",
            )

    async def Infer(
        self, request_iterator: AsyncIterator[worker_pb2.InferFrame], context: grpc.aio.ServicerContext
    ) -> None:
        running: dict[int, asyncio.Task[None]] = {}
        slots = asyncio.Semaphore(self.max_in_flight)
        write_lock = asyncio.Lock()

        async def send(result: worker_pb2.InferResult) -> None:
            async with write_lock:  # one write at a time on a stream
                await context.write(result)

        async def run(frame: worker_pb2.InferFrame, request: pb.ModelInferRequest) -> None:
            try:
                result = await self._answer(frame, request)
            except asyncio.CancelledError:
                return  # the gateway cancelled it (its client went away), or the stream is closing
            finally:
                running.pop(frame.tag, None)
            await send(result)

        self._streams.add(context)
        try:
            async for frame in request_iterator:
                if frame.cancel:
                    task = running.get(frame.tag)
                    if task is not None:
                        task.cancel()
                    continue
                try:
                    request = pb.ModelInferRequest.FromString(frame.request)
                except Exception:
                    await send(await self._answer(frame, None))
                    continue
                if self.inference.runs_now(request):
                    await send(await self._answer(frame, request))
                else:
                    await slots.acquire()  # at the bound, read no further until a running frame answers
                    task = asyncio.create_task(run(frame, request))
                    task.add_done_callback(lambda _: slots.release())
                    running[frame.tag] = task
            # The gateway half-closed: answer what is in flight, then end the stream.
            while running:
                await asyncio.gather(*list(running.values()), return_exceptions=True)
        finally:
            self._streams.discard(context)
            for task in list(running.values()):
                task.cancel()
