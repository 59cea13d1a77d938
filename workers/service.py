"""ModelManager: the versions loaded on this worker, their batchers, memory budget, LRU eviction, stats."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from bisect import bisect_left
from collections.abc import AsyncGenerator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from prometheus_client import REGISTRY, Gauge
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from mesh.codec import InputSpecs
from mesh.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    InvalidVersion,
    MeshError,
    ModelNotFound,
    ResourceExhausted,
    Unavailable,
    VersionNotFound,
)
from mesh.store import ArtifactStore
from mesh.versions import version_number
from mesh_pb import common_pb2, worker_pb2
from workers.batcher import BatchingPolicy, BatchObserver, DynamicBatcher, VersionStats
from workers.runtimes import Runtime, load_runtime, serving_thread_init

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]

_LABELS = ("model", "version")
_QUEUE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_COMPUTE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
_BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
LOADED_VERSIONS = Gauge("maas_worker_loaded_versions", "Versions loaded on this worker", ("worker",))
VERSION_MEMORY = Gauge("maas_worker_version_memory_bytes", "Memory held by a loaded version", _LABELS)

# Responses a decoupled model's generator may run ahead of its reader before it gives its compute thread
# back (ModelManager.generate): enough that a thread hand-off is rare against the steps it runs, few
# enough that a stream whose client stopped reading holds a handful of responses per request.
GENERATE_WINDOW = 16


class _Histogram:
    """Bucket counts and a sum kept as plain numbers; exposed as a Prometheus histogram at scrape time."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # first bound >= value: Prometheus' "le"
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*map(floatToGoString, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


class VersionMetrics:
    """One version's Prometheus series, counted on the request path as plain numbers.

    prometheus_client's own Counter and Histogram take a lock per update; a small model's request made
    five of them (about 8 µs of a request's CPU between requests). These are plain increments on the
    event loop's thread, turned into metric families only when Prometheus scrapes (WorkerMetrics).
    """

    __slots__ = ("batch", "compute", "failures", "queue", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.failures = 0
        self.queue = _Histogram(_QUEUE_BUCKETS)
        self.compute = _Histogram(_COMPUTE_BUCKETS)
        self.batch = _Histogram(_BATCH_BUCKETS)


class WorkerMetrics(Collector):
    """The per-version series of every version this process has served (kept after an unload, as
    labelled children of a Counter would be, so counters never go backwards)."""

    def __init__(self) -> None:
        self._versions: dict[tuple[str, str], VersionMetrics] = {}
        self._lock = threading.Lock()

    def version(self, model: str, version: str) -> VersionMetrics:
        with self._lock:
            return self._versions.setdefault((model, version), VersionMetrics())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            versions = list(self._versions.items())
        requests = CounterMetricFamily(
            "maas_worker_requests", "Inference requests received per version", labels=_LABELS
        )
        failures = CounterMetricFamily(
            "maas_worker_request_failures", "Inference requests that failed per version", labels=_LABELS
        )
        queue = HistogramMetricFamily(
            "maas_worker_queue_seconds", "Time requests wait in the batcher queue", labels=_LABELS
        )
        compute = HistogramMetricFamily(
            "maas_worker_compute_seconds",
            "Time of one batched forward pass (input merge + infer + output split)",
            labels=_LABELS,
        )
        batch = HistogramMetricFamily(
            "maas_worker_batch_size", "Batch size of each forward pass", labels=_LABELS
        )
        for label, m in versions:
            requests.add_metric(label, m.requests)
            failures.add_metric(label, m.failures)
            queue.add_metric(label, m.queue.buckets(), m.queue.sum)
            compute.add_metric(label, m.compute.buckets(), m.compute.sum)
            batch.add_metric(label, m.batch.buckets(), m.batch.sum)
        yield from (requests, failures, queue, compute, batch)


METRICS = WorkerMetrics()
REGISTRY.register(METRICS)


class _MetricsObserver(BatchObserver):
    def __init__(self, metrics: VersionMetrics) -> None:
        self.metrics = metrics

    def on_batch(self, size: int, requests: int, queue_ns: list[int], compute_ns: int, ok: bool) -> None:
        m = self.metrics
        for q in queue_ns:
            m.queue.observe(q / 1e9)
        m.compute.observe(compute_ns / 1e9)
        if ok:
            m.batch.observe(size)


@dataclass(eq=False)
class ServedVersion:
    """One version loaded here: its record, runtime, batcher and counters."""

    record: common_pb2.ModelVersion
    runtime: Runtime
    batcher: DynamicBatcher
    stats: VersionStats
    memory_bytes: int
    loaded_ms: int
    last_used_ms: int = 0
    streams: int = 0
    metrics: VersionMetrics = field(default_factory=VersionMetrics)

    # The record never changes while the version is loaded: read its fields once, not per request.
    @cached_property
    def name(self) -> str:
        return self.record.ref.name

    @cached_property
    def version(self) -> int:
        return int(self.record.ref.version)

    @cached_property
    def version_str(self) -> str:
        return str(self.record.ref.version)

    @cached_property
    def decoupled(self) -> bool:
        return self.record.signature.decoupled

    @cached_property
    def max_batch_size(self) -> int:
        return int(self.record.signature.max_batch_size)

    @cached_property
    def input_specs(self) -> InputSpecs:
        """The signature's inputs prepared for mesh.codec.validate_request."""
        return InputSpecs(self.record.signature.inputs)

    @property
    def busy(self) -> int:
        return self.batcher.queue_depth + self.batcher.in_flight + self.streams


def policy_for(record: common_pb2.ModelVersion, device: torch.device | None = None) -> BatchingPolicy:
    sig, b = record.signature, record.batching
    return BatchingPolicy(
        # A GPU forward pass waits for the device; that wait would block the event loop: always a thread.
        inline_compute_us=0
        if device is not None and device.type != "cpu"
        else BatchingPolicy.inline_compute_us,
        max_batch_size=max(0, sig.max_batch_size),
        enabled=b.enabled and sig.max_batch_size > 1 and not sig.decoupled,
        max_queue_delay_us=int(b.max_queue_delay_us),
        preferred_batch_sizes=tuple(int(p) for p in b.preferred_batch_sizes),
        max_queue_size=int(b.max_queue_size),
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def default_budget(device: torch.device) -> int:
    """80% of the GPU's memory on CUDA, half the machine's RAM on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.8)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)
    except (OSError, ValueError):
        return 8 << 30


class ModelManager:
    """Versions loaded on this worker. Transport-free: the servicers only decode, call and encode."""

    def __init__(
        self,
        store: ArtifactStore,
        device: torch.device,
        *,
        worker_id: str = "",
        memory_budget_bytes: int = 0,
        compute_threads: int = 4,
        load_threads: int = 1,
        warmup: bool = True,
        graph_rewrites: bool = True,
    ) -> None:
        self.store = store
        self.device = device
        self.worker_id = worker_id
        self.memory_budget = memory_budget_bytes or default_budget(device)
        self.warmup = warmup
        self.graph_rewrites = graph_rewrites
        # torch.set_num_threads() reaches OpenMP/MKL only in the thread that calls it: a thread that never
        # did runs its GEMMs on an OpenMP team of one thread per CPU, whose spinning workers cost 20-50x the
        # forward pass itself on a small CPU box. Every compute and load thread applies the process's setting;
        # compute threads also hold inference mode (hold_inference_mode).
        threads = torch.get_num_threads()
        self.executor = ThreadPoolExecutor(
            max(1, compute_threads),
            thread_name_prefix="compute",
            initializer=serving_thread_init,
            initargs=(threads,),
        )
        self._load_executor = ThreadPoolExecutor(
            max(1, load_threads),
            thread_name_prefix="load",
            initializer=torch.set_num_threads,
            initargs=(threads,),
        )
        self._models: dict[str, dict[int, ServedVersion]] = {}
        self._newest: dict[str, ServedVersion] = {}
        self._load_locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._budget_lock = asyncio.Lock()
        self.draining = False
        self.failures: dict[tuple[str, int], str] = {}
        self._loaded_gauge = LOADED_VERSIONS.labels(worker_id or "worker")

    # -- lookup (hot path) -------------------------------------------------------------------------------

    def resolve(self, name: str, version: str = "") -> ServedVersion:
        """The loaded version a request names: "" = the newest version of the model loaded here."""
        if self.draining:
            raise Unavailable("worker is draining: retry on another worker")
        return self.get(name, version)

    def get(self, name: str, version: str = "") -> ServedVersion:
        """Like resolve() but also while draining (metadata, statistics)."""
        if not version:
            sv = self._newest.get(name)
            if sv is None:
                raise ModelNotFound(name)
            return sv
        versions = self._models.get(name)
        if versions is None:
            raise ModelNotFound(name)
        number = version_number(version)
        if number is None:  # a worker knows no aliases: the gateway sends it version numbers
            raise InvalidVersion(name, version)
        sv = versions.get(number)  # type: ignore[assignment]
        if sv is None:
            raise VersionNotFound(name, version)
        return sv

    def versions(self) -> list[ServedVersion]:
        return [sv for versions in self._models.values() for sv in versions.values()]

    def model_versions(self, name: str) -> list[ServedVersion]:
        return sorted(self._models.get(name, {}).values(), key=lambda sv: sv.version)

    # -- inference ---------------------------------------------------------------------------------------

    async def infer(
        self,
        sv: ServedVersion,
        inputs: Mapping[str, np.ndarray],
        deadline: float | None = None,
        priority: int = 0,
        requests: int = 1,
    ) -> Arrays:
        """One request through the version's dynamic batcher; `priority` is the request's v2 ``priority``
        parameter (0 = default level; lower values are taken from the queue first); `requests`: the
        client requests it carries (a gateway's merged request counts each in the statistics)."""
        if sv.decoupled:
            raise InvalidArgument(f"model '{sv.name}' is decoupled: call it with ModelStreamInfer")
        sv.last_used_ms = _now_ms()
        metrics = sv.metrics
        metrics.requests += 1
        try:
            return await sv.batcher.submit(inputs, deadline, priority, requests)
        except BaseException:
            metrics.failures += 1
            raise

    def count_failure(self, sv: ServedVersion, started_ns: int) -> None:
        """Requests refused before reaching the batcher (bad input) still count as failures."""
        sv.stats.fail.add(time.monotonic_ns() - started_ns)
        sv.metrics.requests += 1
        sv.metrics.failures += 1

    async def generate(
        self, sv: ServedVersion, inputs: Mapping[str, np.ndarray], deadline: float | None = None
    ) -> AsyncGenerator[Arrays, None]:
        """Decoupled versions: the model's generator runs on a compute thread, responses come back here.

        The generator runs at most GENERATE_WINDOW responses ahead of the caller: then it gives its thread
        back and resumes (on whichever compute thread is free) once the caller has taken them all, so a
        caller that stops pulling (its client stopped reading) holds neither a thread nor a growing queue.
        `deadline` (loop time) ends the generation with DeadlineExceeded once it passes."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()
        source: list[Iterator[Arrays]] = []  # made by the first run, on a compute thread

        def post(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:  # loop closed: nobody is listening any more
                stop.set()

        def produce() -> None:
            try:
                if not source:
                    source.append(iter(sv.runtime.generate(inputs)))
                responses = source[0]
                for _ in range(GENERATE_WINDOW):
                    if stop.is_set():
                        return
                    try:
                        out = next(responses)
                    except StopIteration:
                        post("end", None)
                        return
                    post("item", out)
            except BaseException as exc:
                post("error", exc)
                return
            post("park", None)  # after the window's items, so the caller takes them all before resuming

        def close_source() -> None:
            # Closing runs a generator's cleanup (its `with` blocks): on a compute thread, as its steps.
            close = getattr(source[0], "close", None) if source else None
            if close is not None:
                with contextlib.suppress(RuntimeError):  # the executor is shut down: nothing to run it on
                    self.executor.submit(close)

        sv.last_used_ms = _now_ms()
        sv.metrics.requests += 1
        sv.streams += 1
        start = time.monotonic_ns()
        first = True
        finished = False
        ok = False
        running = loop.run_in_executor(self.executor, produce)
        try:
            while True:
                if deadline is None:
                    kind, value = await queue.get()
                else:
                    try:
                        if deadline <= loop.time():  # a get with responses waiting would not wait at all
                            raise TimeoutError
                        async with asyncio.timeout_at(deadline):
                            kind, value = await queue.get()
                    except TimeoutError:
                        raise DeadlineExceeded(
                            f"deadline exceeded: '{sv.name}' was still generating when the request's "
                            "deadline (its 'timeout' parameter or the call's deadline) passed"
                        ) from None
                if first:
                    first = False
                    sv.stats.queue.add(0)
                if kind == "item":
                    yield value
                elif kind == "park":
                    running = loop.run_in_executor(self.executor, produce)
                elif kind == "error":
                    finished = True
                    if isinstance(value, MeshError):
                        raise value
                    raise RuntimeError(
                        f"model '{sv.name}' failed: {type(value).__name__}: {value}"
                    ) from value
                else:
                    finished = ok = True
                    return
        finally:
            stop.set()
            if not finished:  # once the run under way (if any) returns, nothing else touches the generator
                running.add_done_callback(lambda _: close_source())
            sv.streams -= 1
            elapsed = time.monotonic_ns() - start
            st = sv.stats
            if ok:
                st.success.add(elapsed)
                st.inference_count += 1
                st.execution_count += 1
                st.last_inference_ms = _now_ms()
                st.compute_input.add(0)
                st.compute_infer.add(elapsed)
                st.compute_output.add(0)
            else:
                st.fail.add(elapsed)
                sv.metrics.failures += 1

    # -- loading -----------------------------------------------------------------------------------------

    def used_memory(self) -> int:
        return sum(sv.memory_bytes for sv in self.versions())

    async def load(self, record: common_pb2.ModelVersion) -> ServedVersion:
        """Verifies the artifact's sha256, loads and warms the version up, evicting LRU versions to fit."""
        name, version = record.ref.name, int(record.ref.version)
        if not name or version <= 0:
            raise InvalidArgument("version.ref: a model name and a version > 0 are required")
        if self.draining:
            raise Unavailable("worker is draining")
        lock = self._load_locks.setdefault((name, version), asyncio.Lock())
        async with lock:
            existing = self._models.get(name, {}).get(version)
            if existing is not None:
                if existing.record.sha256 == record.sha256:
                    return existing
                await self.unload(name, version)
            loop = asyncio.get_running_loop()
            try:
                path = await loop.run_in_executor(
                    self._load_executor, self.store.verify, record.artifact_uri, record.sha256
                )
                if self.device.type == "cuda":
                    # GPU memory runs out hard: make room for about the artifact's size before loading.
                    estimate = int(record.size_bytes) or path.stat().st_size
                    await self._make_room(min(estimate, self.memory_budget), exclude=(name, version))
                before = self._device_bytes()
                runtime = await loop.run_in_executor(
                    self._load_executor,
                    lambda: load_runtime(
                        record, path, self.device, warmup=self.warmup, graph_rewrites=self.graph_rewrites
                    ),
                )
            except MeshError as exc:
                self.failures[(name, version)] = exc.message
                raise
            memory = max(
                runtime.memory_bytes, self._device_bytes() - before if self.device.type == "cuda" else 0
            )
            if memory > self.memory_budget:
                runtime.close()
                msg = f"memory: {name}:{version} needs {memory} bytes, the worker's budget is {self.memory_budget}"
                self.failures[(name, version)] = msg
                raise ResourceExhausted(msg)
            self.failures.pop((name, version), None)
            sv = self._install(record, runtime, memory)
            await self._make_room(0, exclude=(name, version))
            log.info("loaded %s:%s on %s (%d bytes)", name, version, self.device, memory)
            return sv

    def _install(self, record: common_pb2.ModelVersion, runtime: Runtime, memory: int) -> ServedVersion:
        name, version = record.ref.name, int(record.ref.version)
        stats = VersionStats()
        label = (name, str(version))
        metrics = METRICS.version(*label)
        batcher = DynamicBatcher(
            runtime.forward,
            policy_for(record, self.device),
            self.executor,
            name=f"{name}:{version}",
            stats=stats,
            observer=_MetricsObserver(metrics),
        )
        batcher.start()
        sv = ServedVersion(
            record=record,
            runtime=runtime,
            batcher=batcher,
            stats=stats,
            memory_bytes=memory,
            loaded_ms=_now_ms(),
            last_used_ms=_now_ms(),
            metrics=metrics,
        )
        self._models.setdefault(name, {})[version] = sv
        self._refresh_newest(name)
        VERSION_MEMORY.labels(*label).set(memory)
        self._loaded_gauge.set(len(self.versions()))
        return sv

    def _refresh_newest(self, name: str) -> None:
        versions = self._models.get(name)
        if versions:
            self._newest[name] = versions[max(versions)]
        else:
            self._models.pop(name, None)
            self._newest.pop(name, None)

    def _device_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return _rss_bytes()

    async def _make_room(self, needed: int, exclude: tuple[str, int]) -> None:
        """Unloads least-recently-used versions until `needed` more bytes fit in the budget."""
        async with self._budget_lock:
            while self.used_memory() + needed > self.memory_budget:
                candidates = [sv for sv in self.versions() if (sv.name, sv.version) != exclude]
                if not candidates:
                    if needed > self.memory_budget:
                        raise ResourceExhausted(
                            f"memory: {exclude[0]}:{exclude[1]} needs about {needed} bytes, "
                            f"the worker's budget is {self.memory_budget}"
                        )
                    return
                victim = min(candidates, key=lambda sv: sv.last_used_ms)
                log.info(
                    "evicting %s:%s (least recently used) to fit the memory budget",
                    victim.name,
                    victim.version,
                )
                await self.unload(victim.name, victim.version)

    async def unload(self, name: str, version: int, timeout_s: float = 30.0) -> None:
        """Stops routing to a version, lets its in-flight requests finish, frees its memory."""
        versions = self._models.get(name)
        sv = versions.pop(version, None) if versions else None
        if sv is None:
            raise VersionNotFound(name, version)
        self._refresh_newest(name)
        self._loaded_gauge.set(len(self.versions()))
        await sv.batcher.drain(timeout_s)
        deadline = time.monotonic() + timeout_s
        # Streams keep no event of their own; a 10 ms poll while unloading costs nothing on the hot path.
        while sv.streams and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await sv.batcher.close()
        sv.runtime.close()
        try:
            VERSION_MEMORY.remove(name, str(version))
        except KeyError:
            pass
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("unloaded %s:%s", name, version)

    async def unload_model(self, name: str) -> int:
        """Unloads every version of a model; returns how many."""
        versions = list(self._models.get(name, {}))
        for v in versions:
            await self.unload(name, v)
        return len(versions)

    # -- drain / stats -----------------------------------------------------------------------------------

    def in_flight(self) -> int:
        return sum(sv.busy for sv in self.versions())

    async def drain(self, timeout_s: float) -> bool:
        """Refuses new requests (UNAVAILABLE) and waits for in-flight ones; False if time ran out."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        # In-flight work spans every batcher and stream: poll (shutdown only, never on the hot path).
        while self.in_flight() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return self.in_flight() == 0

    def worker_stats(self, address: str = "") -> worker_pb2.WorkerStats:
        used = self.used_memory()
        stats = worker_pb2.WorkerStats(
            worker_id=self.worker_id,
            address=address,
            device=str(self.device),
            memory_total_bytes=self._total_memory(),
            memory_used_bytes=used,
            memory_budget_bytes=self.memory_budget,
            draining=self.draining,
        )
        for sv in self.versions():
            stats.loaded.add(
                ref=common_pb2.ModelRef(name=sv.name, version=sv.version),
                queue_depth=sv.batcher.queue_depth,
                in_flight=sv.batcher.in_flight + sv.streams,
                memory_bytes=sv.memory_bytes,
                last_used_ms=sv.last_used_ms,
            )
        return stats

    def _total_memory(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.get_device_properties(self.device).total_memory)
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (OSError, ValueError):
            return 0

    async def close(self) -> None:
        for sv in self.versions():
            try:
                await self.unload(sv.name, sv.version, timeout_s=1.0)
            except MeshError:
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._load_executor.shutdown(wait=False, cancel_futures=True)


def parse_preload(spec: str) -> list[tuple[str, str]]:
    """ "digits:1,encoder:latest" -> [("digits", "1"), ("encoder", "")]; "latest"/missing = registry default."""
    out: list[tuple[str, str]] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, version = part.partition(":")
        if not name:
            raise FailedPrecondition(f"preload: entry {part!r} names no model")
        version = version.strip()
        out.append((name.strip(), "" if version in ("", "latest") else version))
    return out
