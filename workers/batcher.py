"""Transport-free dynamic batcher: merges concurrent requests along dim 0 into one forward pass."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import numpy as np

from mesh.aio import wait_event
from mesh.errors import DeadlineExceeded, Internal, InvalidArgument, MeshError, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
# Forward passes a version must have run (in a compute thread) before it may run on the event loop.
_INLINE_MIN_SAMPLES = 8
# Queue level of default-priority requests when no default_priority_level is set: after every level a
# request can name (priorities are uint64 on the wire).
_LAST_LEVEL = 2**64
RunFn = Callable[[Mapping[str, np.ndarray]], Arrays]


@dataclass(frozen=True)
class BatchingPolicy:
    """Triton's dynamic_batching block for one version."""

    max_batch_size: int = 0
    """Largest merged batch; 0 = the model has no batch dimension (requests never merge)."""
    enabled: bool = True
    """False: every request runs alone (still queued, still in a worker thread)."""
    max_queue_delay_us: int = 0
    """How long the oldest queued request waits for company before its batch runs."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Batch sizes dispatched as soon as they can be formed."""
    max_queue_size: int = 0
    """Queued requests above which submit() raises ResourceExhausted; 0 = unbounded."""
    instances: int = 1
    """Batches of this version computed at the same time."""
    inline_compute_us: int = 500
    """When this version's forward passes take less than this on average (microseconds of CPU), a batch that
    finds nothing else computing runs on the event loop itself instead of a compute thread (the thread
    hand-off costs about 0.1 ms of CPU, as much as a small model's whole forward pass); with no queue
    delay, a request that finds the batcher idle then runs at once, without waking the queue's loop.
    0 = always a compute thread."""
    priority_levels: int = 0
    """Priority levels 1..N a request may name (its ``priority`` parameter; lower = served first); a
    priority above N gets the default level, as in Triton. 0 = no bound: every priority >= 1 is a level."""
    default_priority_level: int = 0
    """Level of requests with priority 0 (none given) or above priority_levels; 0 = after every level,
    so any request that names a priority is served before those that do not."""

    @property
    def merges(self) -> bool:
        return self.enabled and self.max_batch_size > 1


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchSizeStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class VersionStats:
    """Triton-shaped statistics of one version; compute_* counts are per request, so always equal."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, BatchSizeStats] = field(default_factory=dict)


@dataclass(eq=False)
class _Item:
    inputs: Mapping[str, np.ndarray]
    size: int
    key: tuple[Any, ...]
    future: asyncio.Future[Arrays]
    enqueued_ns: int
    timer: asyncio.TimerHandle | None = None
    taken: bool = False
    # Queue position: (priority level, arrival number); the queue is kept sorted by it.
    order: tuple[int, int] = (0, 0)
    # Client requests this one stands for (a gateway merges concurrent ones): statistics count each.
    requests: int = 1

    def failed(self, stats: VersionStats, now_ns: int | None = None) -> None:
        """Counts this item's client requests as failed, each for the time since it was queued."""
        if now_ns is None:
            now_ns = time.monotonic_ns()
        stats.fail.add((now_ns - self.enqueued_ns) * self.requests, self.requests)


class BatchObserver:
    """Hook for metrics: called on the event loop after each batch."""

    def on_batch(self, size: int, requests: int, queue_ns: list[int], compute_ns: int, ok: bool) -> None:
        pass


def _merge_key(inputs: Mapping[str, np.ndarray]) -> tuple[Any, ...]:
    return tuple((name, arr.dtype.str, arr.shape[1:]) for name, arr in sorted(inputs.items()))


class DynamicBatcher:
    """Queues requests of one version and runs them in merged batches on an executor thread.

    Queued requests are taken by priority level (lower first), in arrival order within a level; a batch
    starts from the first queued request and fills with compatible ones in that same order. Priority is
    strict, as in Triton: under a steady stream of higher-priority requests lower ones wait (their
    deadlines still apply). The max queue delay counts from the oldest queued request. Each
    request's deadline is honoured while it waits (it leaves with DeadlineExceeded); a cancelled
    request leaves the queue at once; a full queue refuses new requests with ResourceExhausted. When a
    merged batch fails, its requests are retried one by one so that one bad request fails alone.
    """

    def __init__(
        self,
        run: RunFn,
        policy: BatchingPolicy,
        executor: Executor | None = None,
        *,
        name: str = "",
        stats: VersionStats | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        self._run_fn = run
        self.policy = policy
        self._executor = executor
        self.name = name
        self.stats = stats if stats is not None else VersionStats()
        self._observer = observer
        self._queue: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.in_flight = 0
        self._delay_s = policy.max_queue_delay_us / 1e6 if policy.merges else 0.0
        limit = policy.max_batch_size if policy.merges else 1
        self._early = min(max(policy.preferred_batch_sizes), limit) if policy.preferred_batch_sizes else limit
        self._limit = limit
        self._preferred = sorted(p for p in policy.preferred_batch_sizes if 0 < p <= limit)
        levels, default = policy.priority_levels, policy.default_priority_level
        if levels < 0 or default < 0 or (levels and default > levels):
            raise ValueError(f"priority: default level {default} outside levels 1..{levels}")
        self._default_level = default or _LAST_LEVEL
        self._arrivals = itertools.count()
        # Moving average of the forward pass (ns) and how many passes it has seen: cheap versions run
        # on the event loop when idle (see BatchingPolicy.inline_compute_us).
        self._inline_ns = policy.inline_compute_us * 1000
        self._compute_avg_ns = 0.0
        self._compute_samples = 0
        self._delay_over = False

    # -- public ------------------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def runs_now(self) -> bool:
        """Whether a request submitted now computes at once on the event loop (the idle fast path)."""
        return not self._queue and self.in_flight == 0 and self._delay_s == 0 and self._inline_ok()

    def start(self) -> None:
        if self._tasks:
            return
        for i in range(max(1, self.policy.instances)):
            self._tasks.append(asyncio.create_task(self._loop(), name=f"batcher-{self.name}-{i}"))

    async def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        deadline: float | None = None,
        priority: int = 0,
        requests: int = 1,
    ) -> Arrays:
        """Runs one request (possibly merged with others); `deadline` is in loop.time() seconds.

        `priority` is the request's v2 ``priority`` parameter: 0 = the default level, otherwise a lower
        value is taken from the queue first (see BatchingPolicy.priority_levels). `requests`: how many
        client requests this one carries (a gateway's merged request), as the statistics count them.
        """
        if self._closed:
            raise Unavailable(f"model '{self.name}' is unloading")
        policy = self.policy
        size = 1
        if policy.max_batch_size > 0:
            size = next(iter(inputs.values())).shape[0] if inputs else 1
            if size > policy.max_batch_size:
                raise InvalidArgument(
                    f"inputs: batch size {size} exceeds max_batch_size {policy.max_batch_size} of '{self.name}'"
                )
        if policy.max_queue_size and len(self._queue) >= policy.max_queue_size:
            raise ResourceExhausted(f"queue of '{self.name}' is full ({policy.max_queue_size} requests)")
        loop = asyncio.get_running_loop()
        if deadline is not None and deadline <= loop.time():
            raise DeadlineExceeded(f"deadline expired before '{self.name}' could queue the request")
        if not self._tasks:
            self.start()
        if self.runs_now:
            # Idle fast path: nothing queued or computing, no delay to wait for company, a cheap model:
            # compute here and now (no queue wake-up, no thread hand-off).
            item = _Item(
                inputs, size, (), loop.create_future(), time.monotonic_ns(), taken=True, requests=requests
            )
            self._run_inline([item])
            return item.future.result()
        item = _Item(
            inputs,
            size,
            _merge_key(inputs) if policy.merges else (),
            loop.create_future(),
            time.monotonic_ns(),
            order=(self._level(priority) if priority else self._default_level, next(self._arrivals)),
            requests=requests,
        )
        if deadline is not None:
            item.timer = loop.call_at(deadline, self._expire, item)
        queue = self._queue
        if not queue or queue[-1].order <= item.order:
            queue.append(item)  # the usual case: one level, or not ahead of the last request
        else:
            self._insert(item)
        self._idle.clear()
        self._wakeup.set()
        try:
            return await item.future
        except asyncio.CancelledError:
            # A cancelled client frees its slot at once (its batch, if already running, finishes anyway).
            queued = not item.taken
            self._drop(item)
            if queued and deadline is not None and loop.time() >= deadline - 0.005:
                # gRPC cancelled the call at its deadline just before the queue's own timer fired:
                # the same expiry, counted as the same failure.
                item.failed(self.stats)
            raise

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Waits until nothing is queued or computing; returns False on timeout."""
        return await wait_event(self._idle, timeout_s)

    async def close(self) -> None:
        """Stops the loops; requests still queued fail with Unavailable."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        while self._queue:
            item = self._queue.popleft()
            self._fail(item, Unavailable(f"model '{self.name}' was unloaded"))
        self._idle.set()

    # -- queue management --------------------------------------------------------------------------------

    def _level(self, priority: int) -> int:
        if priority < 0:
            raise InvalidArgument(f"priority: must be >= 0, got {priority}")
        levels = self.policy.priority_levels
        if priority == 0 or (levels and priority > levels):
            return self._default_level
        return priority

    def _insert(self, item: _Item) -> None:
        """Puts a request ahead of every queued one of a later level (after its own level's)."""
        queue = self._queue
        at = len(queue)
        for other in reversed(queue):
            if other.order <= item.order:
                break
            at -= 1
        queue.insert(at, item)

    def _drop(self, item: _Item) -> None:
        if item.timer is not None:
            item.timer.cancel()
        if not item.taken:
            item.taken = True
            try:
                self._queue.remove(item)
            except ValueError:
                pass
            self._maybe_idle()

    def _expire(self, item: _Item) -> None:
        if item.taken or item.future.done():
            return
        self._drop(item)
        item.failed(self.stats)
        item.future.set_exception(
            DeadlineExceeded(f"request to '{self.name}' waited in the queue past its deadline")
        )

    def _fail(self, item: _Item, exc: BaseException) -> None:
        if item.timer is not None:
            item.timer.cancel()
        if not item.future.done():
            item.future.set_exception(exc)

    def _maybe_idle(self) -> None:
        if not self._queue and self.in_flight == 0:
            self._idle.set()

    def _pending_size(self) -> int:
        return sum(it.size for it in self._queue)

    def _take(self, limit: int) -> list[_Item]:
        batch: list[_Item] = []
        total = 0
        key: tuple[Any, ...] | None = None
        keep: deque[_Item] = deque()
        if not self.policy.merges:
            while self._queue:
                item = self._queue.popleft()
                if item.future.done():
                    item.taken = True
                    continue
                item.taken = True
                if item.timer is not None:
                    item.timer.cancel()
                return [item]
            return batch
        while self._queue:
            item = self._queue.popleft()
            if item.future.done():
                item.taken = True
                continue
            if key is None:
                key = item.key
            if item.key != key or total + item.size > limit:
                keep.append(item)
                if total >= limit:
                    break
                continue
            item.taken = True
            if item.timer is not None:
                item.timer.cancel()
            batch.append(item)
            total += item.size
        keep.extend(self._queue)
        self._queue = keep
        if self._preferred and len(batch) > 1 and total not in self._preferred:
            # Cut back to the largest preferred size that a prefix of whole requests reaches.
            cut, running = 0, 0
            for i, it in enumerate(batch):
                running += it.size
                if running in self._preferred:
                    cut = i + 1
            if cut:
                back = batch[cut:]
                for it in back:
                    it.taken = False
                # Back in their places (a skipped incompatible request may have been ahead of them).
                self._queue = deque(sorted((*back, *self._queue), key=attrgetter("order")))
                batch = batch[:cut]
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._delay_s > 0 and self._pending_size() < self._early:
                # The oldest request sets the dispatch time (with priorities it need not be the first).
                oldest = min(it.enqueued_ns for it in self._queue)
                dispatch_at = oldest / 1e9 + self._delay_s
                wait = dispatch_at - time.monotonic()
                if wait > 0:
                    # One timer per batch; the batch goes when it fires. Re-arming until the clock agrees
                    # would spin: the loop's timers have millisecond granularity, delays are often less.
                    self._delay_over = False
                    handle = loop.call_later(wait, self._end_delay)
                    while not self._delay_over and self._queue and self._pending_size() < self._early:
                        self._wakeup.clear()
                        await self._wakeup.wait()
                    handle.cancel()
            batch = self._take(self._limit)
            if not batch:
                self._maybe_idle()
                continue
            if self.in_flight == 0 and self._inline_ok():
                self._run_inline(batch)
            else:
                await self._execute(batch)

    # -- execution ---------------------------------------------------------------------------------------

    def _compute(self, batch: list[_Item]) -> tuple[list[Arrays], int, int, int]:
        c0 = time.thread_time_ns()
        t0 = time.monotonic_ns()
        if len(batch) == 1:
            inputs: Mapping[str, np.ndarray] = batch[0].inputs
        else:
            inputs = {name: np.concatenate([it.inputs[name] for it in batch]) for name in batch[0].inputs}
        t1 = time.monotonic_ns()
        outputs = self._run_fn(inputs)
        t2 = time.monotonic_ns()
        if len(batch) == 1:
            parts = [outputs]
        else:
            total = sum(it.size for it in batch)
            for name, arr in outputs.items():
                if arr.ndim == 0 or arr.shape[0] != total:
                    raise Internal(f"output '{name}' has batch {arr.shape[:1]}, expected {total}")
            parts = []
            start = 0
            for it in batch:
                end = start + it.size
                parts.append({name: arr[start:end] for name, arr in outputs.items()})
                start = end
        t3 = time.monotonic_ns()
        # CPU time of this thread, not wall time: waiting for the GIL or for the CPU while other work runs
        # inflates wall time, but only CPU time would block the event loop if the batch ran there.
        self._record_compute(time.thread_time_ns() - c0)
        return parts, t1 - t0, t2 - t1, t3 - t2

    def _end_delay(self) -> None:
        self._delay_over = True
        self._wakeup.set()

    def _inline_ok(self) -> bool:
        return self._compute_samples >= _INLINE_MIN_SAMPLES and self._compute_avg_ns < self._inline_ns

    def _record_compute(self, ns: int) -> None:
        # Runs on a compute thread or the loop; a lost update under a race only delays the estimate.
        # Samples are capped at 1.5x the inline limit: one outlier (a page fault, a GC pass) must not
        # push a cheap model off the inline path for the next dozen requests, while a model that is
        # really slower than the limit still converges above it.
        n = self._compute_samples
        if self._inline_ns:
            ns = min(ns, self._inline_ns + self._inline_ns // 2)
        self._compute_avg_ns = ns if n == 0 else self._compute_avg_ns + (ns - self._compute_avg_ns) * 0.2
        self._compute_samples = n + 1

    def _run_inline(self, batch: list[_Item]) -> None:
        """Computes a batch on the event loop (cheap versions, nothing else computing); settles its futures."""
        start_ns = time.monotonic_ns()
        queue_ns = [start_ns - it.enqueued_ns for it in batch]
        n = len(batch)
        self.in_flight += n
        try:
            parts, in_ns, infer_ns, out_ns = self._compute(batch)
        except Exception as exc:
            self.in_flight -= n
            if n > 1:
                # Find the culprit: rerun each request alone so the others still succeed.
                for it in batch:
                    self._run_inline([it])
                return
            self._failed(batch, exc, queue_ns, start_ns)
            return
        self.in_flight -= n
        self._succeeded(batch, parts, queue_ns, in_ns, infer_ns, out_ns)

    async def _execute(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        start_ns = time.monotonic_ns()
        queue_ns = [start_ns - it.enqueued_ns for it in batch]
        self.in_flight += len(batch)
        try:
            parts, in_ns, infer_ns, out_ns = await loop.run_in_executor(self._executor, self._compute, batch)
        except asyncio.CancelledError:
            self.in_flight -= len(batch)
            for it in batch:
                self._fail(it, Unavailable(f"model '{self.name}' was unloaded"))
            raise
        except Exception as exc:
            self.in_flight -= len(batch)
            if len(batch) > 1:
                # Find the culprit: rerun each request alone so the others still succeed.
                for it in batch:
                    await self._execute([it])
                return
            self._failed(batch, exc, queue_ns, start_ns)
            return
        self.in_flight -= len(batch)
        self._succeeded(batch, parts, queue_ns, in_ns, infer_ns, out_ns)

    def _failed(self, batch: list[_Item], exc: Exception, queue_ns: list[int], start_ns: int) -> None:
        err = (
            exc
            if isinstance(exc, MeshError)
            else Internal(f"model '{self.name}' failed: {type(exc).__name__}: {exc}")
        )
        if not isinstance(exc, MeshError):
            log.warning("model %s raised %s: %s", self.name, type(exc).__name__, exc)
        now = time.monotonic_ns()
        for it in batch:
            it.failed(self.stats, now)
            self._fail(it, err)
        if self._observer is not None:
            self._observer.on_batch(batch[0].size, 1, queue_ns, now - start_ns, False)
        self._maybe_idle()

    def _succeeded(
        self,
        batch: list[_Item],
        parts: list[Arrays],
        queue_ns: list[int],
        in_ns: int,
        infer_ns: int,
        out_ns: int,
    ) -> None:
        now = time.monotonic_ns()
        n = batch[0].requests if len(batch) == 1 else sum(it.requests for it in batch)
        size = batch[0].size if len(batch) == 1 else sum(it.size for it in batch)
        st = self.stats
        st.inference_count += size
        st.execution_count += 1
        st.last_inference_ms = int(time.time() * 1000)
        # Per-request counts (Triton's): compute_input/infer/output counts stay equal for perf_analyzer.
        st.compute_input.add(in_ns * n, n)
        st.compute_infer.add(infer_ns * n, n)
        st.compute_output.add(out_ns * n, n)
        bs = st.batches.get(size)
        if bs is None:
            bs = st.batches[size] = BatchSizeStats()
        bs.compute_input.add(in_ns)
        bs.compute_infer.add(infer_ns)
        bs.compute_output.add(out_ns)
        for it, part, q in zip(batch, parts, queue_ns, strict=True):
            st.queue.add(q * it.requests, it.requests)
            if it.future.done():
                continue
            st.success.add((now - it.enqueued_ns) * it.requests, it.requests)
            it.future.set_result(part)
        if self._observer is not None:
            self._observer.on_batch(size, len(batch), queue_ns, in_ns + infer_ns + out_ns, True)
        self._maybe_idle()
