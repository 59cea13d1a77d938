"""Request coalescing: concurrent ModelInfer requests for one version merged along the batch dim.

One Python gRPC call costs about as much CPU as the worker's whole inference on a small model, so the
gateway sends fewer, larger calls when it is busy. Requests for the same version that arrive while that
version already has `max_inflight` upstream calls running (or within `window_s`, when set) wait in a queue;
when a call finishes, the queued requests with the same input names, datatypes and non-batch dims are
concatenated into one request (raw contents joined, batch dims summed), sent once, and the response is
split back row by row. A request that finds a free slot and an empty queue goes out at once, untouched,
so a lone client pays no added latency.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from math import prod
from typing import Any

from mesh.codec import COALESCED_REQUESTS
from mesh.errors import Internal
from mesh.v2 import pb

Send = Callable[[Any, "float | None"], Awaitable[Any]]
"""Forwards one request upstream with an optional timeout (seconds) and returns the response."""

MergeKey = tuple[tuple[tuple[str, str, tuple[int, ...]], ...], tuple[str, ...]]

_LEN = struct.Struct("<I")

# Request parameters that say nothing about a unary request's own computation: perf_analyzer sends
# `triton_enable_empty_final_response` on every ModelInfer (it only shapes decoupled streams), so a
# request carrying just these still merges. Any other parameter (priority, timeout, sequence_*, ...)
# keeps the request to a call of its own.
NEUTRAL_PARAMETERS = frozenset({"triton_enable_empty_final_response"})


def merge_key(request: Any) -> tuple[MergeKey, int] | None:
    """(compatibility key, batch size) of a request that may be merged with others, else None.

    Mergeable: raw contents for every input, no request/input/output parameters other than the
    NEUTRAL_PARAMETERS (priority, timeouts, sequence ids, classification, shared memory all opt out),
    and one batch size across inputs.
    """
    params = request.parameters
    if params and not NEUTRAL_PARAMETERS.issuperset(params):
        return None
    inputs = request.inputs
    if not inputs or len(request.raw_input_contents) != len(inputs):
        return None
    batch = -1
    parts = []
    for tensor in inputs:
        shape = tensor.shape
        if not shape or tensor.parameters:
            return None
        if batch < 0:
            batch = shape[0]
        elif shape[0] != batch:
            return None
        parts.append((tensor.name, tensor.datatype, tuple(shape[1:])))
    if batch < 1:
        return None
    outputs = []
    for out in request.outputs:
        if out.parameters:
            return None
        outputs.append(out.name)
    return (tuple(parts), tuple(outputs)), batch


def merge_requests(requests: list[Any], total: int) -> Any:
    """One request carrying every row of `requests` (all with the same merge key), in order."""
    first = requests[0]
    merged = pb.ModelInferRequest(model_name=first.model_name, model_version=first.model_version)
    for tensor in first.inputs:
        out = merged.inputs.add()
        out.name = tensor.name
        out.datatype = tensor.datatype
        out.shape.append(total)
        out.shape.extend(tensor.shape[1:])
    for k in range(len(first.inputs)):
        merged.raw_input_contents.append(b"".join(r.raw_input_contents[k] for r in requests))
    for requested in first.outputs:
        merged.outputs.add().name = requested.name
    merged.parameters[COALESCED_REQUESTS].int64_param = len(requests)  # the worker counts each
    return merged


def _bytes_row_offsets(raw: bytes, rows: int, per_row: int, where: str) -> list[int]:
    """Byte offset of each row start (and the end) in a length-prefixed BYTES tensor."""
    offsets = [0]
    pos = 0
    size = len(raw)
    for _ in range(rows):
        for _ in range(per_row):
            if pos + 4 > size:
                raise Internal(f"{where}: BYTES contents shorter than the shape says")
            (length,) = _LEN.unpack_from(raw, pos)
            pos += 4 + length
        offsets.append(pos)
    if pos != size:
        raise Internal(f"{where}: BYTES contents longer than the shape says")
    return offsets


def split_response(response: Any, requests: list[Any], batches: list[int]) -> list[Any]:
    """Splits a merged response back into one response per request (ids echoed)."""
    total = sum(batches)
    outputs = response.outputs
    raws = response.raw_output_contents
    if len(raws) != len(outputs):
        raise Internal("outputs: upstream answered without raw_output_contents; cannot split a merged batch")
    results = []
    for request in requests:
        r = pb.ModelInferResponse(
            model_name=response.model_name, model_version=response.model_version, id=request.id
        )
        for key, value in response.parameters.items():
            r.parameters[key].CopyFrom(value)
        results.append(r)
    for i, out in enumerate(outputs):
        shape = list(out.shape)
        where = f"outputs[{i}]"
        if not shape or shape[0] != total:
            raise Internal(f"{where}.shape: expected batch dim {total} in a merged response, got {shape}")
        raw = raws[i]
        rest = shape[1:]
        if out.datatype == "BYTES":
            offsets = _bytes_row_offsets(raw, total, prod(rest), where)
        else:
            if len(raw) % total:
                raise Internal(f"{where}: {len(raw)} bytes do not split into {total} rows")
            row = len(raw) // total
            offsets = [row * j for j in range(total + 1)]
        view = memoryview(raw)
        row_start = 0
        for r, batch in zip(results, batches, strict=True):
            t = r.outputs.add()
            t.name = out.name
            t.datatype = out.datatype
            t.shape.append(batch)
            t.shape.extend(rest)
            for key, value in out.parameters.items():
                t.parameters[key].CopyFrom(value)
            r.raw_output_contents.append(bytes(view[offsets[row_start] : offsets[row_start + batch]]))
            row_start += batch
    return results


@dataclass(slots=True, eq=False)
class _Pending:
    request: Any
    key: MergeKey
    batch: int
    send: Send
    deadline: float | None
    future: asyncio.Future[Any]
    run: _Run | None = None


@dataclass(slots=True, eq=False)
class _Run:
    live: int
    task: asyncio.Task[None] | None = None


@dataclass(slots=True, eq=False)
class _Group:
    inflight: int = 0
    pending: deque[_Pending] = field(default_factory=deque)
    pending_rows: int = 0
    timer: asyncio.TimerHandle | None = None


class Coalescer:
    """Merges concurrent requests per group (one group = one model version)."""

    def __init__(
        self,
        *,
        max_inflight: Callable[[Hashable], int],
        window_s: float = 0.0,
        on_batch: Callable[[Hashable, int, int], None] | None = None,
        min_inflight: int = 1,
    ) -> None:
        self._max_inflight = max_inflight
        # A lower bound of max_inflight(group), checked first so the fast path skips computing the limit.
        self._floor = max(1, min_inflight)
        self._window_s = window_s
        self._on_batch = on_batch
        self._groups: dict[Hashable, _Group] = {}
        self._max_batch: dict[Hashable, int] = {}

    def inflight(self, group: Hashable) -> int:
        g = self._groups.get(group)
        return g.inflight if g else 0

    async def infer(
        self, group: Hashable, request: Any, max_batch: int, timeout: float | None, send: Send
    ) -> Any:
        """Sends `request` alone or merged with others of the same group; returns its own response."""
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = _Group()
        mk = None
        if (
            not g.pending
            and self._window_s <= 0
            and (g.inflight < self._floor or g.inflight < self._max_inflight(group))
        ):
            pass  # fast path: a free upstream slot and nobody waiting; the request goes out unchanged
        elif max_batch > 0:
            mk = merge_key(request)
            if mk is not None and mk[1] > max_batch:
                mk = None
        if mk is None:
            g.inflight += 1
            try:
                return await send(request, timeout)
            finally:
                g.inflight -= 1
                if g.pending:
                    self._flush(group, g)
        self._max_batch[group] = max_batch
        loop = asyncio.get_running_loop()
        p = _Pending(
            request=request,
            key=mk[0],
            batch=mk[1],
            send=send,
            deadline=None if timeout is None else time.monotonic() + timeout,
            future=loop.create_future(),
        )
        g.pending.append(p)
        g.pending_rows += p.batch
        if g.inflight < self._max_inflight(group):
            if self._window_s <= 0 or g.pending_rows >= max_batch:
                self._flush(group, g)
            elif g.timer is None:
                g.timer = loop.call_later(self._window_s, self._flush, group, g)
        try:
            return await p.future
        except asyncio.CancelledError:
            run = p.run
            if run is not None:
                run.live -= 1
                if run.live <= 0 and run.task is not None:
                    run.task.cancel()
            raise

    def _flush(self, group: Hashable, g: _Group) -> None:
        if g.timer is not None:
            g.timer.cancel()
            g.timer = None
        limit = self._max_inflight(group)
        max_batch = self._max_batch.get(group, 1)
        while g.pending and g.inflight < limit:
            first = g.pending.popleft()
            g.pending_rows -= first.batch
            if first.future.done():
                continue
            members = [first]
            total = first.batch
            rest: deque[_Pending] = deque()
            for p in g.pending:
                if p.future.done():
                    g.pending_rows -= p.batch
                elif p.key == first.key and total + p.batch <= max_batch:
                    members.append(p)
                    total += p.batch
                    g.pending_rows -= p.batch
                else:
                    rest.append(p)
            g.pending = rest
            run = _Run(live=len(members))
            for p in members:
                p.run = run
            g.inflight += 1
            run.task = asyncio.get_running_loop().create_task(self._run(group, g, members, total))

    async def _run(self, group: Hashable, g: _Group, members: list[_Pending], total: int) -> None:
        try:
            deadlines = [p.deadline for p in members if p.deadline is not None]
            # The merged call lives as long as its most patient member allows.
            timeout = None if len(deadlines) < len(members) else max(0.0, max(deadlines) - time.monotonic())
            if len(members) == 1:
                response = await members[0].send(members[0].request, timeout)
                responses = [response]
            else:
                requests = [p.request for p in members]
                merged = merge_requests(requests, total)
                response = await members[0].send(merged, timeout)
                responses = split_response(response, requests, [p.batch for p in members])
            if self._on_batch is not None:
                self._on_batch(group, len(members), total)
            for p, r in zip(members, responses, strict=True):
                if not p.future.done():
                    p.future.set_result(r)
        except asyncio.CancelledError:
            for p in members:
                if not p.future.done():
                    p.future.cancel()
        except Exception as exc:
            for p in members:
                if not p.future.done():
                    p.future.set_exception(exc)
        finally:
            g.inflight -= 1
            if g.pending:
                self._flush(group, g)
