"""Gateway logic: authorize, resolve, validate, pick a worker, forward (merged when busy), answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import grpc
import grpc.aio

from gateway.auth import ANONYMOUS, Authenticator, Principal
from gateway.coalesce import Coalescer
from gateway.metrics import IN_FLIGHT, METRICS, STREAM_QUEUED, STREAMS
from gateway.ratelimit import RateLimiter
from gateway.settings import GatewaySettings
from gateway.upstream import WorkerLink
from mesh.codec import InputSpecs, validate_request
from mesh.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MeshError,
    ModelNotFound,
    NotFound,
    Unavailable,
    error_for_code,
    from_rpc_error,
)
from mesh.logging import request_id_var
from mesh.server import GRPC_ERROR_KEY, REQUEST_ID_KEY, grpc_error_mode, open_channel
from mesh.v2 import config_pb, pb, pb_grpc
from mesh_pb import common_pb2, router_pb2
from router.picker import Endpoint, Picker, VersionInfo

log = logging.getLogger(__name__)

SERVER_NAME = "maas-mesh"
# Only what this gateway implements (perf_analyzer reads the list).
EXTENSIONS = (
    "model_repository",
    "model_repository(unload_dependents)",
    "model_configuration",
    "statistics",
)
PLATFORM = "pytorch"
FINAL = "triton_final_response"
# Upstream answers that mean "this worker did not do the work": it is gone, refusing (draining), or its
# server cancelled the call while shutting down. Our own client cancelling arrives as CancelledError.
_RETRY_ELSEWHERE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
_READY = common_pb2.READY
_STATE_TEXT = {
    common_pb2.REGISTERED: ("UNAVAILABLE", "registered, not loaded"),
    common_pb2.LOADING: ("LOADING", ""),
    common_pb2.FAILED: ("UNAVAILABLE", "failed"),
    common_pb2.REJECTED: ("UNAVAILABLE", "rejected by its accuracy gate"),
    common_pb2.RETIRED: ("UNAVAILABLE", "retired"),
}
_STREAM_DONE = object()
_DRAIN = object()  # the gateway is stopping: end the stream once what it sent is answered

Metadata = Iterable[tuple[str, Any]] | None
PlaceFn = Callable[[router_pb2.PlaceRequest, float], Awaitable[router_pb2.PlaceResponse]]


def _config_type(datatype: str) -> int:
    name = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
    try:
        return int(config_pb.DataType.Value(name))
    except ValueError:
        return int(config_pb.TYPE_INVALID)


def _add_duration(dst: Any, src: Any) -> None:
    dst.count += src.count
    dst.ns += src.ns


def _merge_stats(dst: Any, src: Any) -> None:
    """Adds one worker's ModelStatistics for a version into the gateway's total."""
    dst.last_inference = max(dst.last_inference, src.last_inference)
    dst.inference_count += src.inference_count
    dst.execution_count += src.execution_count
    for field in (
        "success",
        "fail",
        "queue",
        "compute_input",
        "compute_infer",
        "compute_output",
        "cache_hit",
        "cache_miss",
    ):
        _add_duration(getattr(dst.inference_stats, field), getattr(src.inference_stats, field))
    by_size = {b.batch_size: b for b in dst.batch_stats}
    for b in src.batch_stats:
        mine = by_size.get(b.batch_size)
        if mine is None:
            mine = by_size[b.batch_size] = dst.batch_stats.add(batch_size=b.batch_size)
        for field in ("compute_input", "compute_infer", "compute_output"):
            _add_duration(getattr(mine, field), getattr(b, field))
    dst.memory_usage.extend(src.memory_usage)
    for key, rs in src.response_stats.items():
        mine_rs = dst.response_stats[key]
        for field in ("compute_infer", "compute_output", "success", "fail", "empty_response", "cancel"):
            _add_duration(getattr(mine_rs, field), getattr(rs, field))


class _SeenStats:
    """One worker's statistics for one version: what it reported last, plus what it had counted before
    its counters started again from zero (it restarted, or reloaded the version)."""

    __slots__ = ("carried", "last")

    def __init__(self) -> None:
        self.last: Any = None
        self.carried: Any = None

    def update(self, stats: Any) -> None:
        last = self.last
        if last is not None and (
            stats.inference_count < last.inference_count
            or stats.execution_count < last.execution_count
            or stats.inference_stats.success.count < last.inference_stats.success.count
        ):
            if self.carried is None:
                self.carried = pb.ModelStatistics(name=last.name, version=last.version)
            _merge_stats(self.carried, last)
            del self.carried.memory_usage[:]  # memory of a life that ended
        self.last = stats

    def add_to(self, total: Any, serving: bool) -> None:
        """Adds this worker's counts to `total`; its memory only while it still serves the version."""
        if self.carried is not None:
            _merge_stats(total, self.carried)
        last = self.last
        if last is not None:
            if not serving and last.memory_usage:
                last = pb.ModelStatistics()
                last.CopyFrom(self.last)
                del last.memory_usage[:]
            _merge_stats(total, last)


def _is_final(response: Any) -> bool:
    if response.error_message:
        return True
    params = response.infer_response.parameters
    if FINAL in params:
        return bool(params[FINAL].bool_param)
    return True


def _stream_error(request_id: str, message: str, model: str = "", version: str = "") -> Any:
    r = pb.ModelStreamInferResponse(error_message=message)
    r.infer_response.id = request_id
    if model:
        r.infer_response.model_name = model
        r.infer_response.model_version = version
    return r


def _stream_failure(request_id: str, exc: MeshError) -> Any:
    """A request's error on a stream that stays open; the message leads with the status code, which
    an error_message response has no field for."""
    return _stream_error(request_id, f"{exc.code.name}: {exc.message}")


@dataclass(slots=True)
class _Sent:
    """A streamed request on one upstream: its endpoint slot, itself (to resend), whether it got an answer."""

    endpoint: Endpoint
    request: Any
    retry: bool
    answered: bool = False


@dataclass(slots=True)
class _Resend:
    """A streamed request whose worker's stream broke before any answer: to send again elsewhere, once."""

    request: Any
    worker_id: str


class _Outbox:
    """What one client stream's response loop takes next: workers' responses, errors, and its own
    bookkeeping (upstreams opened, resends, ends).

    Responses and errors (`put`) wait while `limit` items are queued, so a client that does not read
    stops the gateway reading its workers, and flow control pushes back to the client's own writes;
    bookkeeping (`put_nowait`) never waits, since it is sent from cleanup code that must not block."""

    __slots__ = ("_closed", "_items", "_limit", "_ready", "_space")

    def __init__(self, limit: int) -> None:
        self._items: deque[Any] = deque()
        self._limit = limit
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put_nowait(self, item: Any) -> None:
        if self._closed:  # the stream ended: what its producers still report goes nowhere
            return
        self._items.append(item)
        STREAM_QUEUED.inc()
        self._ready.set()
        if len(self._items) >= self._limit:
            self._space.clear()

    async def put(self, item: Any) -> None:
        while len(self._items) >= self._limit:
            self._space.clear()
            await self._space.wait()
        self.put_nowait(item)

    def discard(self) -> None:
        """Drops what the client will never read (its stream ended)."""
        self._closed = True
        STREAM_QUEUED.dec(len(self._items))
        self._items.clear()
        self._space.set()  # releases producers waiting for room (their items are dropped)

    async def get(self) -> Any:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        STREAM_QUEUED.dec()
        if len(self._items) < self._limit:
            self._space.set()
        return item


class _StreamUpstream:
    """One upstream ModelStreamInfer call to one worker, on behalf of one client stream."""

    def __init__(
        self,
        address: str,
        call: Any,
        out: _Outbox,
        picker: Picker,
        eject_s: float,
        affinity: dict[str, _StreamUpstream],
        grpc_error: bool = False,
    ) -> None:
        self.address = address
        self.grpc_error = grpc_error
        self.call = call
        self.out = out
        self.picker = picker
        self.eject_s = eject_s
        # The client stream's request id -> upstream map: an id leaves it with its last pending request.
        self.affinity = affinity
        # Requests sent per request id, oldest first; each leaves on its final response.
        self.pending: dict[str, deque[_Sent]] = {}
        self.broken: str | None = None
        self._writing = asyncio.Lock()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def send(self, request: Any, endpoint: Endpoint, retry: bool) -> None:
        """Sends one request; `retry`: it may be resent elsewhere once if the stream breaks unanswered."""
        self.pending.setdefault(request.id, deque()).append(_Sent(endpoint, request, retry))
        try:
            # One write at a time on a call (grpc core fails a second one under way): the client's
            # requests and resends from a broken upstream can arrive here together.
            async with self._writing:
                await self.call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            self._release(request.id)
            raise Unavailable(f"worker {endpoint.worker_id}: stream closed ({exc})") from None

    def _release(self, request_id: str) -> None:
        sent = self.pending.get(request_id)
        if sent:
            self.picker.release(sent.popleft().endpoint)
            if not sent:
                del self.pending[request_id]
                self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        """Ends an id's affinity to this upstream once nothing of it is in flight here (the map would
        otherwise keep every id a long-lived stream ever sent)."""
        if self.affinity.get(request_id) is self:
            del self.affinity[request_id]

    async def _read(self) -> None:
        # Whether the worker failed the stream (it died, drained, or ended it with requests unanswered):
        # only then is it ejected and are unanswered requests sent elsewhere. A stream that ends
        # because of its client (a cancel, the client's deadline, a request's own error status in
        # triton_grpc_error mode) says nothing about the worker, which other clients keep using.
        worker_failed = False
        client_gone = False
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    worker_failed = bool(self.pending)
                    break
                request_id = response.infer_response.id
                if _is_final(response):
                    self._release(request_id)
                else:
                    sent = self.pending.get(request_id)
                    if sent:
                        sent[0].answered = True
                await self.out.put(response)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            self.broken = exc.details() or code.name
            worker_failed = code == grpc.StatusCode.UNAVAILABLE
            if self.grpc_error and code not in _RETRY_ELSEWHERE:
                # The worker ended the stream with a request's real status (triton_grpc_error mode).
                await self.out.put(error_for_code(code, exc.details() or code.name))
        except asyncio.CancelledError:
            client_gone = True  # the client's stream ended: nobody reads `out` any more
            raise
        finally:
            # Requests still waiting for a final answer: sent again elsewhere when the worker failed and
            # nothing of them came back yet (once), otherwise answered with an error, so clients never
            # wait forever.
            for request_id, sent in list(self.pending.items()):
                self._forget(request_id)
                for item in sent:
                    self.picker.release(item.endpoint)
                    if worker_failed:
                        self.picker.eject(item.endpoint.worker_id, self.eject_s)
                    if client_gone:
                        continue
                    if worker_failed and item.retry and not item.answered:
                        self.out.put_nowait(_Resend(item.request, item.endpoint.worker_id))
                    else:
                        self.out.put_nowait(
                            _stream_error(request_id, f"worker stream ended: {self.broken or 'closed'}")
                        )
            self.pending.clear()
            self.out.put_nowait(_STREAM_DONE)

    async def close_writing(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self.call.done_writing()

    def cancel(self) -> None:
        self.call.cancel()
        self.reader.cancel()


def inflight_for_device(device: str) -> int:
    """Upstream calls per worker before requests queue and merge, when the setting leaves it to the
    device: one on a CPU worker (measured on a 2-vCPU box at concurrency 16 with perf_analyzer: 94-104%
    of direct-to-worker throughput with one, 74-84% with two), two on an accelerator."""
    return 1 if device.startswith("cpu") else 2


class GatewayService:
    """The public v2 API's logic, transport-free: the servicer decodes, calls these methods, encodes."""

    def __init__(
        self,
        settings: GatewaySettings,
        picker: Picker,
        *,
        auth: Authenticator | None,
        limiter: RateLimiter,
        registry: Any | None = None,
        place: PlaceFn | None = None,
    ) -> None:
        self.settings = settings
        self.picker = picker
        self._auth = auth
        self._limiter = limiter
        self._registry = registry
        self._place = place
        self._retries = max(0, settings.retries)
        self._eject_s = settings.eject_s
        self._default_timeout = settings.default_timeout_s if settings.default_timeout_s > 0 else None
        self._coalesce = settings.coalesce
        self._per_worker = max(0, settings.coalesce_inflight_per_worker)  # 0: by device
        self.coalescer = Coalescer(
            max_inflight=self._max_inflight,
            window_s=max(0.0, settings.coalesce_window_ms) / 1000.0,
            on_batch=self._on_batch,
            min_inflight=max(1, self._per_worker),
        )
        self._stubs: dict[str, Any] = {}
        self._links: dict[str, WorkerLink] = {}
        self._multiplex = settings.upstream == "stream"
        self._stream_max_bytes = settings.stream_max_bytes
        self._stream_max_queued = settings.stream_max_queued
        self._channels: dict[str, grpc.aio.Channel] = {}
        # (model, version) -> (the signature it was built from, its inputs prepared for validate_request)
        self._specs: dict[tuple[str, int], tuple[Any, InputSpecs]] = {}
        self._closing: dict[str, asyncio.TimerHandle] = {}
        # (worker address, model, version) -> the statistics that worker reported for it, every life.
        self._stats_seen: dict[tuple[str, str, int], _SeenStats] = {}
        # Open client streams (their outboxes), and whether the gateway is stopping (drain).
        self._streams: set[_Outbox] = set()
        self._draining = False
        self._drained = asyncio.Event()  # set when draining and the last stream ended

    # ------------------------------------------------------------------ table & channels

    def on_table(self, table: router_pb2.RouteTable) -> None:
        """Installs a route table (RouteWatcher callback); closes channels of workers that left it."""
        if not self.picker.set_table(table):
            return
        addresses = {e.address for m in table.models for v in m.versions for e in v.endpoints}
        loop = asyncio.get_running_loop()
        for address in list(self._channels):
            if address in addresses:
                handle = self._closing.pop(address, None)
                if handle is not None:
                    handle.cancel()
            elif address not in self._closing:
                # Later, not now: requests in flight on it finish, and a worker that comes back keeps its channel.
                self._closing[address] = loop.call_later(30.0, self._close_channel, address)

    def _close_channel(self, address: str) -> None:
        self._closing.pop(address, None)
        self._stubs.pop(address, None)
        link = self._links.pop(address, None)
        channel = self._channels.pop(address, None)

        async def close() -> None:
            if link is not None:
                await link.close()
            if channel is not None:
                await channel.close()

        asyncio.get_running_loop().create_task(close())

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, self.settings)
        return channel

    def _stub(self, address: str) -> Any:
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._stubs[address] = pb_grpc.GRPCInferenceServiceStub(self._channel(address))
        return stub

    def _link(self, address: str) -> WorkerLink:
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = WorkerLink(self._channel(address), address)
        return link

    async def drain(self, timeout_s: float) -> None:
        """Stops taking new work on client streams and waits (up to `timeout_s`) for each to end: a stream
        ends once every request it had sent is answered, so a shutdown does not cut a generation short.
        Requests sent meanwhile are answered UNAVAILABLE (on a stream that then ends); new streams are
        refused. Unary calls are left to the server's own grace."""
        self._draining = True
        for out in self._streams:
            out.put_nowait(_DRAIN)
        if self._streams:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout_s)
        if self._streams:
            log.warning(
                "%d client stream(s) still open after the %.1f s drain", len(self._streams), timeout_s
            )

    async def close(self) -> None:
        for handle in self._closing.values():
            handle.cancel()
        self._closing.clear()
        links = list(self._links.values())
        self._links.clear()
        for link in links:
            await link.close()
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        for channel in channels:
            await channel.close()

    # ------------------------------------------------------------------ auth

    async def principal(self, metadata: Metadata) -> Principal:
        if self._auth is None:
            return ANONYMOUS
        return await self._auth.authenticate(metadata)

    async def _authorize_model(self, metadata: Metadata, model: str) -> Principal:
        principal = await self.principal(metadata)
        principal.check_model(model)
        return principal

    # ------------------------------------------------------------------ inference

    def _input_specs(self, model: str, version: int, sig: Any) -> InputSpecs:
        """The version's InputSpecs, rebuilt only when a new route table brings a new signature object."""
        key = (model, version)
        cached = self._specs.get(key)
        if cached is not None and cached[0] is sig:
            return cached[1]
        specs = InputSpecs(sig.inputs)
        self._specs[key] = (sig, specs)
        return specs

    def _max_inflight(self, group: Hashable) -> int:
        model, version = cast(tuple[str, int], group)
        per_worker = self._per_worker
        try:
            info = self.picker.version_info(model, version)
        except MeshError:
            return max(1, per_worker)
        picker = self.picker
        n = 0
        for e in info.endpoints:
            if e.healthy and not picker.is_ejected(e.worker_id):
                n += per_worker or inflight_for_device(e.device)
        return max(1, n)

    def _on_batch(self, group: Hashable, requests: int, rows: int) -> None:
        METRICS.coalesced(group[0], requests, rows)  # type: ignore[index]

    async def infer(self, request: Any, metadata: Metadata, timeout: float | None) -> Any:
        """ModelInfer: one request in, its response out (from one worker, possibly as part of a merged batch)."""
        start = time.perf_counter()
        model = request.model_name
        label_model = "_unknown"
        version_label = ""
        code = "OK"
        IN_FLIGHT.inc()
        try:
            principal = await self.principal(metadata)
            principal.check_model(model)
            self._limiter.check(principal.key_id, principal.rate_limit_rps)
            picker = self.picker
            if not picker.has_table:
                raise Unavailable("gateway: no route table yet (router not reached)")
            version = picker.resolve(model, request.model_version, request.id)
            label_model = model
            version_label = str(version)
            sig = picker.version_info(model, version).signature
            if sig.decoupled:
                raise InvalidArgument(
                    f"model_name: '{model}' is decoupled (several responses per request); use ModelStreamInfer"
                )
            validate_request(request, self._input_specs(model, version, sig), sig.max_batch_size)
            request.model_version = version_label
            if timeout is None:
                timeout = self._default_timeout
            if self._coalesce and sig.max_batch_size > 0:
                response = await self.coalescer.infer(
                    (model, version),
                    request,
                    sig.max_batch_size,
                    timeout,
                    partial(self._forward, model, version),
                )
            else:
                response = await self._forward(model, version, request, timeout)
            if response.id != request.id:
                response.id = request.id
            if response.model_name != model:
                response.model_name = model
            return response
        except MeshError as exc:
            code = exc.code.name
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            IN_FLIGHT.dec()
            METRICS.observe(label_model, version_label, code, time.perf_counter() - start)

    async def _forward(self, model: str, version: int, request: Any, timeout: float | None) -> Any:
        """Sends one request to a worker; on UNAVAILABLE ejects it and tries another replica once."""
        picker = self.picker
        deadline = None if timeout is None else time.monotonic() + timeout
        tried: frozenset[str] = frozenset()
        retries = self._retries
        request_id = request_id_var.get()
        metadata = ((REQUEST_ID_KEY, request_id),)
        # Large requests take a call of their own: on the shared stream their bytes would hold up the
        # small requests queued behind them (one stream delivers its messages in order).
        multiplex = self._multiplex and sum(map(len, request.raw_input_contents)) <= self._stream_max_bytes
        payload = request.SerializeToString() if multiplex else b""
        last: MeshError | None = None
        while True:
            try:
                ep = picker.acquire(model, version, tried)
            except Unavailable:
                if last is not None:
                    raise last from None
                raise
            try:
                remaining = None
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise DeadlineExceeded("deadline exceeded before the request reached a worker")
                if multiplex:
                    data = await self._link(ep.address).infer(payload, remaining, request_id)
                    return pb.ModelInferResponse.FromString(data)
                try:
                    return await self._stub(ep.address).ModelInfer(
                        request, timeout=remaining, metadata=metadata
                    )
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in _RETRY_ELSEWHERE:
                        raise Unavailable(exc.details() or exc.code().name) from None
                    raise from_rpc_error(exc) from None
            except (Unavailable, NotFound) as exc:
                if isinstance(exc, Unavailable):
                    # The worker is gone, or refused before doing the work: skip it for a while.
                    picker.eject(ep.worker_id, self._eject_s)
                # NotFound: the worker does not serve the version the route table placed on it (it was
                # unloaded there a moment before this gateway got the table saying so); the worker
                # itself is fine. Either way it did not do the work, and another replica may.
                if retries <= 0:
                    raise
                retries -= 1
                last = exc
                tried = tried | {ep.worker_id}
                METRICS.retry(model)
            finally:
                picker.release(ep)

    async def stream_infer(
        self, requests: AsyncIterator[Any], metadata: Metadata, timeout: float | None
    ) -> AsyncIterator[Any]:
        """ModelStreamInfer: each request goes to one worker (sticky per request id within the stream);
        responses flow back as the workers send them; per-request errors keep the stream open."""
        if self._draining:
            raise Unavailable("gateway is shutting down: open the stream on another gateway or retry")
        principal = await self.principal(metadata)
        out = _Outbox(self._stream_max_queued)
        upstreams: dict[str, _StreamUpstream] = {}
        affinity: dict[str, _StreamUpstream] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        # `triton_grpc_error: true`: the first failed request ends the stream with its real status code
        # (the worker is asked for the same), instead of an error_message response on an open stream.
        grpc_error = grpc_error_mode(metadata)
        rid_metadata: tuple[tuple[str, str], ...] = ((REQUEST_ID_KEY, request_id_var.get()),)
        if grpc_error:
            rid_metadata += ((GRPC_ERROR_KEY, "true"),)
        STREAMS.inc()

        async def pump() -> None:
            try:
                async for request in requests:
                    if self._draining:
                        refused = Unavailable("gateway is shutting down: send the request on a new stream")
                        if grpc_error:
                            await out.put(refused)
                            return
                        await out.put(_stream_failure(request.id, refused))
                        continue
                    try:
                        await self._stream_one(
                            request, principal, upstreams, affinity, deadline, rid_metadata, out
                        )
                    except MeshError as exc:
                        if grpc_error:
                            await out.put(exc)
                            return
                        await out.put(_stream_failure(request.id, exc))
            finally:
                for up in list(upstreams.values()):
                    await up.close_writing()
                out.put_nowait(_STREAM_DONE)

        async def resend(item: _Resend) -> None:
            # Its worker's stream broke before any answer: once more, on another replica. In a task of its
            # own: a write to the new upstream may wait for flow control, which only the response loop
            # (reading the outbox the upstreams fill) can free.
            try:
                up = await self._stream_one(
                    item.request, principal, upstreams, affinity, deadline, rid_metadata, out,
                    exclude=item.worker_id,
                )  # fmt: skip
                if pumper.done():  # the client already half-closed: so does this new upstream
                    await up.close_writing()
            except MeshError as exc:
                out.put_nowait(exc if grpc_error else _stream_failure(item.request.id, exc))
            finally:
                out.put_nowait(_STREAM_DONE)

        def idle() -> bool:
            """Nothing sent upstream is waiting for its final response."""
            return not resends and not any(up.pending for up in upstreams.values())

        loop = asyncio.get_running_loop()
        pumper = loop.create_task(pump())
        resends: set[asyncio.Task[None]] = set()
        self._streams.add(out)
        try:
            producers = 1  # the pump, plus one per upstream stream it opens and one per resend under way
            while producers:
                item = await out.get()
                if item is _DRAIN:
                    pass
                elif item is _STREAM_DONE:
                    producers -= 1
                elif isinstance(item, _StreamUpstream):
                    producers += 1
                elif isinstance(item, _Resend):
                    METRICS.retry(item.request.model_name)
                    producers += 1
                    task = loop.create_task(resend(item))
                    resends.add(task)
                    task.add_done_callback(resends.discard)
                elif isinstance(item, MeshError):
                    raise item
                else:
                    if _is_final(item):
                        answer = item.infer_response
                        # A model name counts once resolved (it has a version): clients' typos make no series.
                        METRICS.streamed(
                            answer.model_name if answer.model_version else "_unknown", not item.error_message
                        )
                    yield item
                if self._draining and not len(out) and idle():
                    return  # drained: the stream ends with OK, every request it sent answered
            error = pumper.exception() if pumper.done() and not pumper.cancelled() else None
            if error is not None:
                raise error
        finally:
            STREAMS.dec()
            self._streams.discard(out)
            if self._draining and not self._streams:
                self._drained.set()
            out.discard()
            pumper.cancel()
            for task in list(resends):
                task.cancel()
            for up in upstreams.values():
                up.cancel()

    async def _stream_one(
        self,
        request: Any,
        principal: Principal,
        upstreams: dict[str, _StreamUpstream],
        affinity: dict[str, _StreamUpstream],
        deadline: float | None,
        rid_metadata: tuple[tuple[str, str], ...],
        out: _Outbox,
        exclude: str | None = None,
    ) -> _StreamUpstream:
        """Sends one streamed request to a worker (the one its id is sticky to, if any); `exclude`: a
        resend after the worker `exclude` failed, which goes elsewhere and is not resent again."""
        model = request.model_name
        principal.check_model(model)
        if exclude is None:
            self._limiter.check(principal.key_id, principal.rate_limit_rps)
        picker = self.picker
        if not picker.has_table:
            raise Unavailable("gateway: no route table yet (router not reached)")
        version = picker.resolve(model, request.model_version, request.id)
        sig = picker.version_info(model, version).signature
        validate_request(request, self._input_specs(model, version, sig), sig.max_batch_size)
        request.model_version = str(version)
        up = affinity.get(request.id) if request.id and exclude is None else None
        if up is not None and up.broken is None and not up.reader.done():
            ep = self._acquire_on(model, version, up.address)
        else:
            ep = picker.acquire(model, version, frozenset() if exclude is None else frozenset({exclude}))
            up = upstreams.get(ep.address)
            if up is None or up.reader.done():
                remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
                call = self._stub(ep.address).ModelStreamInfer(timeout=remaining, metadata=rid_metadata)
                up = _StreamUpstream(
                    ep.address,
                    call,
                    out,
                    picker,
                    self._eject_s,
                    affinity,
                    (GRPC_ERROR_KEY, "true") in rid_metadata,
                )
                upstreams[ep.address] = up
                out.put_nowait(up)  # counts one more producer for the response loop
        if request.id:
            affinity[request.id] = up
        await up.send(request, ep, retry=exclude is None and self._retries > 0)
        return up

    def _acquire_on(self, model: str, version: int, address: str) -> Endpoint:
        """An endpoint of the version on the worker at `address` (affinity); any endpoint if it left."""
        info = self.picker.version_info(model, version)
        others = frozenset(e.worker_id for e in info.endpoints if e.address != address)
        try:
            return self.picker.acquire(model, version, others)
        except Unavailable:
            return self.picker.acquire(model, version)

    # ------------------------------------------------------------------ health & metadata

    def server_ready(self) -> bool:
        return self.picker.has_table

    def server_metadata(self) -> Any:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self.settings.server_version, extensions=list(EXTENSIONS)
        )

    def _version_for_metadata(self, model: str, version: str) -> VersionInfo:
        """The version a metadata call describes: the named one, else stable, else the latest READY."""
        picker = self.picker
        if version:
            return picker.version_info(model, picker.resolve(model, version))
        route = picker.model_route(model)
        versions = {v.version: v for v in route.versions}
        stable = route.aliases.get("stable")
        if stable in versions:
            return picker.version_info(model, stable)  # type: ignore[arg-type]
        ready = [v for v, vr in versions.items() if vr.state == _READY]
        if ready:
            return picker.version_info(model, max(ready))
        if versions:
            return picker.version_info(model, max(versions))
        raise ModelNotFound(model)

    async def model_ready(self, name: str, version: str, metadata: Metadata) -> bool:
        await self._authorize_model(metadata, name)
        try:
            v = self.picker.resolve(name, version)
            return self.picker.version_info(name, v).ready
        except NotFound:
            return False

    async def model_metadata(self, name: str, version: str, metadata: Metadata) -> Any:
        await self._authorize_model(metadata, name)
        info = self._version_for_metadata(name, version)
        sig = info.signature
        route = self.picker.model_route(name)
        if version:
            versions = [str(info.version)]
        else:
            versions = [str(v.version) for v in route.versions if v.state == _READY] or [str(info.version)]
        response = pb.ModelMetadataResponse(name=name, versions=versions, platform=PLATFORM)
        for specs, target in ((sig.inputs, response.inputs), (sig.outputs, response.outputs)):
            for spec in specs:
                shape = list(spec.shape)
                if sig.max_batch_size > 0 and shape:
                    shape[0] = -1
                target.add(name=spec.name, datatype=spec.datatype, shape=shape)
        return response

    async def model_config(self, name: str, version: str, metadata: Metadata) -> Any:
        await self._authorize_model(metadata, name)
        info = self._version_for_metadata(name, version)
        sig = info.signature
        route = self.picker.model_route(name)
        cfg = config_pb.ModelConfig(
            name=name, platform=PLATFORM, backend=PLATFORM, max_batch_size=sig.max_batch_size
        )
        batched = sig.max_batch_size > 0
        for spec in sig.inputs:
            dims = list(spec.shape[1:] if batched else spec.shape)
            cfg.input.add(
                name=spec.name, data_type=_config_type(spec.datatype), dims=dims, optional=spec.optional
            )  # type: ignore[arg-type]
        for spec in sig.outputs:
            dims = list(spec.shape[1:] if batched else spec.shape)
            cfg.output.add(name=spec.name, data_type=_config_type(spec.datatype), dims=dims)  # type: ignore[arg-type]
        batching = info.batching
        if batching.enabled and batched:
            db = cfg.dynamic_batching
            db.preferred_batch_size.extend(batching.preferred_batch_sizes)
            db.max_queue_delay_microseconds = batching.max_queue_delay_us
            if batching.max_queue_size:
                db.default_queue_policy.max_queue_size = batching.max_queue_size
            db.default_queue_policy.allow_timeout_override = True  # the `timeout` parameter, as a worker says
        cfg.model_transaction_policy.decoupled = sig.decoupled
        cfg.version_policy.specific.versions.extend(
            sorted(v.version for v in route.versions if v.state == _READY)
        )
        devices = {e.device for e in info.endpoints}
        if info.endpoints:
            group = cfg.instance_group.add(name=f"{name}_0", count=len(info.endpoints))
            group.kind = (
                config_pb.ModelInstanceGroup.KIND_GPU
                if any(d.startswith("cuda") for d in devices)
                else config_pb.ModelInstanceGroup.KIND_CPU
            )
        return pb.ModelConfigResponse(config=cfg)

    async def model_statistics(self, name: str, version: str, metadata: Metadata) -> Any:
        """Sums the statistics every worker reports for the version(s) (compute_* counts stay equal)."""
        principal = await self.principal(metadata)
        picker = self.picker
        if name:
            principal.check_model(name)
            route = picker.model_route(name)
            if version:
                wanted = {(name, picker.resolve(name, version))}
            else:
                wanted = {(name, v.version) for v in route.versions}
        else:
            wanted = {
                (m.model, v.version)
                for m in picker.table.models
                if not principal.models or m.model in principal.models
                for v in m.versions
            }
        addresses: dict[str, set[tuple[str, int]]] = {}
        for model, v in wanted:
            for ep in picker.version_info(model, v).endpoints:
                addresses.setdefault(ep.address, set()).add((model, v))
        totals: dict[tuple[str, int], Any] = {}
        for model, v in sorted(wanted):
            totals[(model, v)] = pb.ModelStatistics(name=model, version=str(v))

        async def fetch(address: str) -> Any | None:
            request = pb.ModelStatisticsRequest(
                name=name, version=str(next(iter(wanted))[1]) if version else ""
            )
            try:
                return await self._stub(address).ModelStatistics(request, timeout=2.0)
            except grpc.aio.AioRpcError as exc:
                log.debug("statistics from %s failed: %s", address, exc.code().name)
                return None

        results = await asyncio.gather(*(fetch(a) for a in addresses))
        for address, result in zip(addresses, results, strict=True):
            if result is None:
                continue
            for stats in result.model_stats:
                try:
                    key = (stats.name, int(stats.version))
                except ValueError:
                    continue
                if key in totals and key in addresses[address]:
                    self._worker_stats(address, key).update(stats)
        # Every worker that ever served the version counts, with what it reported last: the totals only
        # grow, as a Triton server's do (perf_analyzer subtracts two readings, and failed a run in
        # which a killed worker's counts dropped out of the sum).
        for (address, model, v), seen in self._stats_seen.items():
            total = totals.get((model, v))
            if total is not None:
                seen.add_to(total, (model, v) in addresses.get(address, ()))
        return pb.ModelStatisticsResponse(model_stats=[totals[k] for k in sorted(totals)])

    def _worker_stats(self, address: str, key: tuple[str, int]) -> _SeenStats:
        seen = self._stats_seen.get((address, *key))
        if seen is None:
            seen = self._stats_seen[(address, *key)] = _SeenStats()
        return seen

    # ------------------------------------------------------------------ repository

    async def repository_index(self, ready_only: bool, metadata: Metadata) -> Any:
        principal = await self.principal(metadata)
        rows: dict[tuple[str, int], tuple[str, str]] = {}
        picker = self.picker
        if self._registry is not None:
            try:
                async with asyncio.timeout(2.0):
                    models = await self._registry.list_models(include_versions=True)
            except Exception as exc:  # registry down: the table alone still answers
                log.warning("repository index without the registry: %s", type(exc).__name__)
                models = []
            for m in models:
                for mv in m.versions:
                    state, reason = _STATE_TEXT.get(mv.state, ("UNAVAILABLE", ""))
                    rows[(m.name, mv.ref.version)] = (state, mv.reason or reason)
        for mr in picker.table.models:
            for vr in mr.versions:
                info = picker.version_info(mr.model, vr.version)
                if info.ready:
                    rows[(mr.model, vr.version)] = ("READY", "")
                elif vr.state == _READY:
                    rows[(mr.model, vr.version)] = ("UNAVAILABLE", "no healthy worker")
                elif (mr.model, vr.version) not in rows:
                    rows[(mr.model, vr.version)] = _STATE_TEXT.get(vr.state, ("UNAVAILABLE", ""))
        response = pb.RepositoryIndexResponse()
        for (model, v), (state, reason) in sorted(rows.items()):
            if principal.models and model not in principal.models:
                continue
            if ready_only and state != "READY":
                continue
            response.models.add(name=model, version=str(v), state=state, reason=reason)
        return response

    async def _known_model(self, name: str) -> None:
        if name in self.picker.models():
            return
        if self._registry is not None:
            with contextlib.suppress(NotFound):
                await self._registry.get_model(name, include_versions=False)
                return
        raise ModelNotFound(name)

    async def repository_load(self, request: Any, metadata: Metadata) -> None:
        principal = await self.principal(metadata)
        principal.check_admin("RepositoryModelLoad")
        name = request.model_name
        principal.check_model(name)
        for key in request.parameters:
            raise InvalidArgument(
                f"parameters[{key!r}]: unrecognized load parameter (models are registered, not uploaded)"
            )
        if not name:
            raise InvalidArgument("model_name: empty")
        await self._known_model(name)
        if self._place is None:
            raise FailedPrecondition("gateway: no router configured to place models")
        await self._place(router_pb2.PlaceRequest(ref=common_pb2.ModelRef(name=name)), 300.0)
        # Answer once this gateway can route to it, as Triton answers once the model is loaded.
        for _ in range(100):
            with contextlib.suppress(MeshError):
                if self.picker.version_info(name, self.picker.resolve(name)).ready:
                    return
            await asyncio.sleep(0.05)

    async def repository_unload(self, request: Any, metadata: Metadata) -> None:
        principal = await self.principal(metadata)
        principal.check_admin("RepositoryModelUnload")
        name = request.model_name
        principal.check_model(name)
        for key, value in request.parameters.items():
            if key != "unload_dependents":
                raise InvalidArgument(f"parameters[{key!r}]: unrecognized unload parameter")
            if value.WhichOneof("parameter_choice") not in (None, "bool_param"):
                raise InvalidArgument("parameters['unload_dependents']: must be a bool")
        if not name:
            raise InvalidArgument("model_name: empty")
        await self._known_model(name)
        if self._place is None:
            raise FailedPrecondition("gateway: no router configured to place models")
        await self._place(router_pb2.PlaceRequest(ref=common_pb2.ModelRef(name=name), unload=True), 120.0)
