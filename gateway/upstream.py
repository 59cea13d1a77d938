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
from collections import deque
from typing import Any

import grpc
import grpc.aio

from mesh.errors import DeadlineExceeded, Unavailable, error_for_code, status_code
from mesh_pb import worker_pb2, worker_pb2_grpc


class StreamBroken(Unavailable):
    """The worker's stream ended or broke before this request's result arrived (retried elsewhere)."""


class _Stream:
    """One open Infer call: its pending requests by tag, and the frames waiting for the writer."""

    __slots__ = ("call", "closed", "outbox", "pending", "wake")

    def __init__(self, call: Any) -> None:
        self.call = call
        self.closed = False
        self.pending: dict[int, asyncio.Future[worker_pb2.InferResult]] = {}
        self.outbox: deque[worker_pb2.InferFrame] = deque()
        self.wake = asyncio.Event()

    def send(self, frame: worker_pb2.InferFrame) -> None:
        self.outbox.append(frame)
        self.wake.set()


class WorkerLink:
    """One multiplexed Infer stream to one worker: opened on first use, reopened after it breaks.

    Frames are written by one writer task per stream, never by the requests' own tasks: in grpc.aio,
    cancelling a task while it awaits `call.write()` cancels the whole call, so a client that gave up
    (a cancel, a short deadline) in the middle of a write would break the stream every other request
    shares.
    """

    def __init__(self, channel: grpc.aio.Channel, address: str) -> None:
        self.address = address
        self._infer = worker_pb2_grpc.WorkerInferenceStub(channel).Infer
        self._stream: _Stream | None = None
        self._next_tag = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._stream.pending) if self._stream is not None else 0

    def _open(self) -> _Stream:
        stream = self._stream = _Stream(self._infer())
        loop = asyncio.get_running_loop()
        for work in (self._read(stream), self._write(stream)):
            task = loop.create_task(work)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return stream

    async def _write(self, stream: _Stream) -> None:
        call, outbox, wake = stream.call, stream.outbox, stream.wake
        try:
            while not stream.closed:
                while outbox:
                    await call.write(outbox.popleft())
                wake.clear()
                await wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception:  # the call ended or broke: the reader fails what is pending
            call.cancel()

    async def _read(self, stream: _Stream) -> None:
        call, pending = stream.call, stream.pending
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
            if self._stream is stream:
                self._stream = None
            stream.closed = True
            call.cancel()  # ends the writer's write, if one is under way
            stream.outbox.clear()
            stream.wake.set()  # and its wait
            error = StreamBroken(f"worker {self.address}: {reason}")
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(error)
            pending.clear()

    async def infer(self, request: bytes, timeout: float | None, request_id: str) -> bytes:
        """Sends one serialized ModelInferRequest; returns the serialized response or raises its error."""
        stream = self._stream if self._stream is not None else self._open()
        pending = stream.pending
        self._next_tag += 1
        tag = self._next_tag
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[worker_pb2.InferResult] = loop.create_future()
        pending[tag] = fut
        stream.send(
            worker_pb2.InferFrame(
                tag=tag,
                request=request,
                timeout_us=max(1, int(timeout * 1e6)) if timeout is not None else 0,
                request_id=request_id,
            )
        )
        timer = None
        try:
            if timeout is not None:
                # The worker drops a request that expires in its queue; this covers one that stalls.
                timer = loop.call_later(timeout + 0.05, _expire, fut)
            result = await fut
        except asyncio.CancelledError:
            # (Cancelling this task cancels the future it awaits too: a cancelled future had no result.)
            if fut.cancelled() or not fut.done():
                self._cancel(stream, tag)
            raise
        except DeadlineExceeded:
            self._cancel(stream, tag)
            raise
        finally:
            pending.pop(tag, None)
            if timer is not None:
                timer.cancel()
        if result.code:
            raise error_for_code(status_code(result.code), result.message)
        return bytes(result.response)

    def _cancel(self, stream: _Stream, tag: int) -> None:
        """Tells the worker to drop a request nobody waits for any more (best effort)."""
        if self._stream is stream:
            stream.send(worker_pb2.InferFrame(tag=tag, cancel=True))

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.call.cancel()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(DeadlineExceeded("deadline exceeded waiting for the worker"))
