"""The gateway's multiplexed data path to one worker (maas.v1.WorkerInference/Infer).

Every unary ModelInfer the gateway forwards to a worker travels as one tagged frame on a single
long-lived stream, and its result comes back tagged, in completion order. On this project's machines a
unary gRPC call costs a Python process about 0.25-0.3 ms of CPU to set up and tear down on each side,
a message on an open stream a fraction of that, which is most of what a gateway hop adds
(docs/benchmarks.md). The semantics of a unary call are kept: a deadline travels with each frame (and is
enforced here too), a cancelled client sends a cancel frame, and a broken stream fails every request on
it with UNAVAILABLE, which the gateway retries once on another replica.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
import grpc.aio

from mesh.errors import DeadlineExceeded, Unavailable, error_for_code, status_code
from mesh_pb import worker_pb2, worker_pb2_grpc


class StreamBroken(Unavailable):
    """The worker's stream ended or broke before this request's result arrived (retried elsewhere)."""


class WorkerLink:
    """One multiplexed Infer stream to one worker: opened on first use, reopened after it breaks."""

    def __init__(self, channel: grpc.aio.Channel, address: str) -> None:
        self.address = address
        self._infer = worker_pb2_grpc.WorkerInferenceStub(channel).Infer
        self._call: Any = None
        self._pending: dict[int, asyncio.Future[worker_pb2.InferResult]] = {}
        self._next_tag = 0
        self._write_lock = asyncio.Lock()
        self._readers: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def _open(self) -> Any:
        call = self._infer()
        self._call = call
        pending: dict[int, asyncio.Future[worker_pb2.InferResult]] = {}
        self._pending = pending
        reader = asyncio.get_running_loop().create_task(self._read(call, pending))
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        return call

    async def _read(self, call: Any, pending: dict[int, asyncio.Future[worker_pb2.InferResult]]) -> None:
        reason = "the worker ended the stream"
        try:
            while True:
                result = await call.read()
                if result is grpc.aio.EOF:
                    break
                fut = pending.pop(result.tag, None)
                if fut is not None and not fut.done():
                    fut.set_result(result)
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details() or 'stream broken'}"
        except asyncio.CancelledError:
            reason = "the gateway closed the stream"
        finally:
            if self._call is call:
                self._call = None
            error = StreamBroken(f"worker {self.address}: {reason}")
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(error)
            pending.clear()

    async def infer(self, request: bytes, timeout: float | None, request_id: str) -> bytes:
        """Sends one serialized ModelInferRequest; returns the serialized response or raises its error."""
        call = self._call if self._call is not None else self._open()
        pending = self._pending
        self._next_tag += 1
        tag = self._next_tag
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[worker_pb2.InferResult] = loop.create_future()
        pending[tag] = fut
        frame = worker_pb2.InferFrame(
            tag=tag,
            request=request,
            timeout_us=max(1, int(timeout * 1e6)) if timeout is not None else 0,
            request_id=request_id,
        )
        timer = None
        try:
            try:
                async with self._write_lock:
                    await call.write(frame)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
                raise StreamBroken(f"worker {self.address}: stream closed ({type(exc).__name__})") from None
            if timeout is not None:
                # The worker drops a request that expires in its queue; this covers one that stalls.
                timer = loop.call_later(timeout + 0.05, _expire, fut)
            result = await fut
        except asyncio.CancelledError:
            # (Cancelling this task cancels the future it awaits too: a cancelled future had no result.)
            if fut.cancelled() or not fut.done():
                self._cancel(call, tag)
            raise
        except DeadlineExceeded:
            self._cancel(call, tag)
            raise
        finally:
            pending.pop(tag, None)
            if timer is not None:
                timer.cancel()
        if result.code:
            raise error_for_code(status_code(result.code), result.message)
        return bytes(result.response)

    def _cancel(self, call: Any, tag: int) -> None:
        """Tells the worker to drop a request nobody waits for any more (best effort, in the background)."""

        async def send() -> None:
            with contextlib.suppress(Exception):
                async with self._write_lock:
                    await call.write(worker_pb2.InferFrame(tag=tag, cancel=True))

        if self._call is call:
            task = asyncio.get_running_loop().create_task(send())
            self._readers.add(task)
            task.add_done_callback(self._readers.discard)

    async def close(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        for task in list(self._readers):
            task.cancel()
        for task in list(self._readers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(DeadlineExceeded("deadline exceeded waiting for the worker"))
