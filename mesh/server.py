"""gRPC bootstrap: servers with health, reflection and error mapping; channels; metrics; signals."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
import signal
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mesh.errors import InvalidArgument, MeshError, ResourceExhausted
from mesh.logging import request_id_var
from mesh.settings import MeshSettings

log = logging.getLogger(__name__)

_MAX_MESSAGE = 2**31 - 1
# Every hop sends what tritonclient sends (INT32_MAX) and channels take any answer: the 4 MiB grpcio
# default would refuse large tensors with RESOURCE_EXHAUSTED at the first internal hop. Servers bound
# what they take from clients by MeshSettings.max_message_mb (ServiceHost).
GRPC_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    # Keepalive detects a dead peer (kill -9, cable pulled) in seconds instead of TCP's minutes.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # A channel to a service that was down retries its connection at most 2 s apart (grpc's default
    # backoff grows to 120 s): measured after a 45 s outage, the first call succeeded 17.6 s after the
    # server was back with the default, 0.3 s with this.
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
# Servers accept the clients' pings above without calling them abusive.
_SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    # A restarted service must not share a port with a stale one.
    ("grpc.so_reuseport", 0),
    # Compressed requests reach the handlers as sent, and ErrorInterceptor inflates them up to the
    # message limit: grpc core inflates a whole message before checking its size, so 1 MiB of gzip on
    # the wire cost a server 1.1 GB of memory on the way to RESOURCE_EXHAUSTED.
    ("grpc.per_message_decompression", 0),
]

_DEFAULTS = MeshSettings.model_construct()  # field defaults, without reading the environment

REQUEST_ID_KEY = "x-request-id"
# Error details travel in trailing metadata, which clients cap at 8 KiB by default: a message quoting a
# huge client input would turn the real status into RESOURCE_EXHAUSTED on the client side.
MAX_ERROR_DETAILS = 2000


def bounded_message(message: str) -> str:
    """An error message cut to MAX_ERROR_DETAILS characters (it travels in trailing metadata)."""
    if len(message) <= MAX_ERROR_DETAILS:
        return message
    return message[:MAX_ERROR_DETAILS] + f"... ({len(message) - MAX_ERROR_DETAILS} more characters)"


GRPC_ERROR_KEY = "triton_grpc_error"


def grpc_error_mode(metadata: Iterable[tuple[str, Any]] | None) -> bool:
    """Whether a stream was opened with `triton_grpc_error: true`: its first failed request then ends it
    with the real status code, instead of an error_message response on a stream that stays open."""
    for key, value in metadata or ():
        if key == GRPC_ERROR_KEY:
            text = value if isinstance(value, str) else bytes(value).decode("ascii", "replace")
            return text.strip().lower() == "true"
    return False


# Request ids minted here: a random per-process prefix and a counter (unique, and no syscall per request).
_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count(1)


# A client's own request id travels on to every hop and into every log line of the request: longer ones
# are refused (a 12,000-character id went through a gateway, then broke its stream to the worker, whose
# metadata limit is 8 KiB). W3C trace ids and UUIDs are far shorter.
MAX_REQUEST_ID = 256


def _request_id(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            rid = value if isinstance(value, str) else value.decode("utf-8", "replace")
            if len(rid) > MAX_REQUEST_ID:
                raise InvalidArgument(
                    f"{REQUEST_ID_KEY}: {len(rid)} characters, at most {MAX_REQUEST_ID} are accepted"
                )
            return rid
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that wraps each method's handler once and reuses the wrapper for every call of
    that method (whatever depends on the call is read from its context inside the wrapper), so a call
    costs one dict lookup here. Subclasses say how to wrap in `_wrap`."""

    def __init__(self) -> None:
        # method -> (the handler it wraps, the wrapped handler)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler to serve `method` with (`handler` itself to leave it as it is)."""
        raise NotImplementedError


def _call_over(context: grpc.aio.ServicerContext) -> bool:
    """Whether a call can no longer carry a status: one was sent already, or its deadline has passed.

    grpc.aio's context has no "the client went away" flag (`cancelled()` only reports a CANCELLED code the
    handler set itself); past the deadline the client has its DEADLINE_EXCEEDED and grpc core ends the
    call, so an abort() then fails in core, which grpc logs as an ERROR with a traceback per call.
    """
    if context.done():
        return True
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def _client_gone(method: str, code: grpc.StatusCode) -> asyncio.CancelledError:
    """What ends a handler whose client has gone: grpc treats CancelledError as a cancelled call and
    only logs it at DEBUG."""
    log.debug("%s ended with %s after its client had gone", method, code.name)
    return asyncio.CancelledError()


def inflate(raw: bytes, limit: int) -> bytes:
    """A request message as its client meant it: a gzip or deflate (zlib) body, which grpc leaves
    compressed (`grpc.per_message_decompression` off), is inflated here, and never past `limit` bytes.

    grpc compresses a whole message into one gzip or zlib stream. A protobuf message never starts with
    gzip's magic (its first byte would be a field with wire type 7, which does not exist), and one that
    happens to start like a zlib header is not a complete, checksummed zlib stream: such bytes are left
    for the parser."""
    if raw[:2] == b"\x1f\x8b":
        wbits = 31
    elif len(raw) > 2 and raw[0] & 0x0F == 8 and raw[0] >> 4 <= 7 and ((raw[0] << 8) | raw[1]) % 31 == 0:
        wbits = 15
    else:
        return raw
    inflater = zlib.decompressobj(wbits)
    try:
        body = inflater.decompress(raw, limit + 1)
    except zlib.error:
        return raw
    if len(body) > limit:
        raise ResourceExhausted(
            f"request: larger than the {limit >> 20} MiB limit once decompressed (MAAS_MAX_MESSAGE_MB)"
        )
    if not inflater.eof or inflater.unused_data:
        return raw
    return body


class ErrorInterceptor(WrappingInterceptor):
    """Maps MeshError to its status code, anything unexpected to INTERNAL (logged), sets request ids."""

    def __init__(self, service: str, max_message_bytes: int = _MAX_MESSAGE) -> None:
        super().__init__()
        self.service = service
        self.max_message_bytes = max_message_bytes

    async def _abort(self, context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
        if isinstance(exc, MeshError):
            code, details = exc.code, bounded_message(exc.message)
        elif isinstance(exc, NotImplementedError):  # generated base servicers raise it for RPCs not served
            code, details = grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by {self.service}"
        else:
            log.error("unhandled error in %s", method, exc_info=exc)
            code, details = grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}"
        if _call_over(context):
            raise _client_gone(method, code)
        try:
            await context.abort(code, details)
        except grpc.aio.InternalError:
            # grpc core ended the call (deadline, client cancel) while the status was on its way: the
            # failed send is no error of the handler's, and nobody is left to tell.
            raise _client_gone(method, code) from None

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        abort = self._abort
        deserialize = handler.request_deserializer
        limit = self.max_message_bytes

        # Requests are parsed here rather than by grpc (the wrapped handlers are registered without a
        # deserializer): a body that is not a valid message is the client's error, INVALID_ARGUMENT,
        # where grpc itself would answer UNKNOWN and log a traceback per request.
        def parse(raw: Any) -> Any:
            raw = inflate(raw, limit)
            if deserialize is None:
                return raw
            try:
                return deserialize(raw)
            except Exception as exc:
                raise InvalidArgument(
                    f"request: not a valid request message for {method} ({type(exc).__name__})"
                ) from None

        async def parsed(raw_iterator: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for raw in raw_iterator:
                yield parse(raw)

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    request_id_var.set(_request_id(context.invocation_metadata()))
                    return await inner_uu(parse(request), context)
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:
                    await abort(context, exc, method)

            return grpc.unary_unary_rpc_method_handler(unary_unary, None, handler.response_serializer)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    request_id_var.set(_request_id(context.invocation_metadata()))
                    return await inner_su(parsed(request_iterator), context)
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:
                    await abort(context, exc, method)

            return grpc.stream_unary_rpc_method_handler(stream_unary, None, handler.response_serializer)

        inner_stream = handler.unary_stream or handler.stream_stream
        client_streams = handler.stream_stream is not None

        # Responses are written with context.write rather than yielded to grpc: when the client has gone
        # (a cancel, a reset) with responses still to send, the failed write surfaces here and ends the
        # call quietly, where grpc itself logs an ERROR with a traceback for every such stream.
        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> None:
            result: Any = None
            try:
                request_id_var.set(_request_id(context.invocation_metadata()))
                result = inner_stream(parsed(request) if client_streams else parse(request), context)
                if inspect.isasyncgen(result):
                    write = context.write
                    async for item in result:
                        try:
                            await write(item)
                        except (grpc.aio.InternalError, grpc.aio.UsageError):
                            raise _client_gone(method, grpc.StatusCode.CANCELLED) from None
                else:
                    await result
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await abort(context, exc, method)
            finally:
                if inspect.isasyncgen(result):
                    await result.aclose()  # runs the handler's own cleanup now, not at garbage collection

        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(streaming, None, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(streaming, None, handler.response_serializer)


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


def server_credentials(
    cert_file: Path | None, key_file: Path | None, ca_file: Path | None
) -> grpc.ServerCredentials | None:
    """TLS server credentials; with a CA file, clients must present a certificate (mTLS)."""
    if cert_file is None or key_file is None:
        return None
    ca = _read(ca_file)
    return grpc.ssl_server_credentials(
        [(key_file.read_bytes(), cert_file.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def channel_credentials(settings: MeshSettings | None) -> grpc.ChannelCredentials | None:
    """Client credentials for calls between services: TLS when a CA is set, mTLS with a cert too."""
    if settings is None or settings.tls_ca_file is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(settings.tls_ca_file),
        private_key=_read(settings.tls_key_file),
        certificate_chain=_read(settings.tls_cert_file),
    )


def open_channel(
    address: str,
    settings: MeshSettings | None = None,
    *,
    options: Sequence[tuple[str, Any]] = (),
    server_name_override: str | None = None,
) -> grpc.aio.Channel:
    """One channel per upstream, reused for every call: GRPC_OPTIONS, plus mTLS when configured."""
    opts = list(GRPC_OPTIONS) + list(options)
    if server_name_override:
        opts.append(("grpc.ssl_target_name_override", server_name_override))
    creds = channel_credentials(settings)
    if creds is not None:
        return grpc.aio.secure_channel(address, creds, options=opts)
    return grpc.aio.insecure_channel(address, options=opts)


class ServiceHost:
    """A grpc.aio server with the error interceptor, grpc.health.v1 and reflection already in place."""

    def __init__(
        self,
        name: str,
        settings: MeshSettings | None = None,
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ServerCredentials | None = None,
        max_message_mb: int | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        if max_message_mb is None:
            max_message_mb = (settings or _DEFAULTS).max_message_mb
        # Channels (GRPC_OPTIONS) take whatever the services they call send; a server bounds what it
        # takes from its clients.
        receive = min(_MAX_MESSAGE, max_message_mb << 20)
        self.server = grpc.aio.server(
            interceptors=[ErrorInterceptor(name, receive), *interceptors],
            options=[
                *(o for o in GRPC_OPTIONS if o[0] != "grpc.max_receive_message_length"),
                ("grpc.max_receive_message_length", receive),
                *_SERVER_OPTIONS,
                *options,
            ],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._services: list[str] = [health.SERVICE_NAME, reflection.SERVICE_NAME]
        if credentials is None and settings is not None:
            credentials = server_credentials(
                settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file
            )
        self._credentials = credentials
        self.port = 0
        self.address = ""

    def add_service(self, full_name: str) -> None:
        """Declares a servicer already added to ``self.server`` (for health and reflection)."""
        self._services.append(full_name)

    async def start(self, bind: str) -> int:
        """Binds (``host:0`` picks a free port), starts, marks every service SERVING; returns the port."""
        reflection.enable_server_reflection(self._services, self.server)
        if self._credentials is not None:
            port = self.server.add_secure_port(bind, self._credentials)
        else:
            port = self.server.add_insecure_port(bind)
        if port == 0:
            raise OSError(f"could not bind {self.name} to {bind}")
        await self.server.start()
        self.port = port
        host = bind.rsplit(":", 1)[0]
        self.address = f"{host}:{port}"
        await self.set_serving(True)
        log.info("%s listening on %s", self.name, self.address)
        return port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ["", *self._services]:
            await self.health.set(service, status)

    async def stop(self, grace_s: float | None = 5.0) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)


async def wait_for_signal(
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> signal.Signals:
    """Waits until one of the signals arrives; returns it."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[signal.Signals] = loop.create_future()

    def arrived(sig: signal.Signals) -> None:
        if not fut.done():
            fut.set_result(sig)

    for sig in signals:
        loop.add_signal_handler(sig, arrived, sig)
    try:
        return await fut
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def run_service(
    host: ServiceHost,
    bind: str,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    grace_s: float = 10.0,
) -> None:
    """Starts the host, serves until SIGTERM/SIGINT, runs on_shutdown (drain), then stops."""
    await host.start(bind)
    sig = await wait_for_signal()
    log.info("%s received %s, shutting down", host.name, sig.name)
    await host.set_serving(False)
    if on_shutdown is not None:
        await on_shutdown()
    await host.stop(grace_s)


def start_metrics_server(port: int, addr: str = "127.0.0.1") -> int:
    """Serves prometheus_client's default registry over HTTP on a thread; returns the bound port."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=addr)
    return int(server.server_port)


def install_uvloop() -> bool:
    """Uses uvloop when installed (about 20% less CPU per gRPC call); returns whether it did."""
    try:
        import uvloop
    except ImportError:
        return False
    uvloop.install()
    return True
