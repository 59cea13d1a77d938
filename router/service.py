"""Router logic: builds the route table from the registry and heartbeats, and places versions on workers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import grpc
import grpc.aio
from prometheus_client import Counter, Gauge

from mesh.aio import wait_event
from mesh.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    MeshError,
    ModelNotFound,
    ResourceExhausted,
    Unavailable,
    VersionNotFound,
    from_rpc_error,
)
from mesh.registry import STABLE_ALIAS, Registry
from mesh.server import open_channel
from mesh.settings import MeshSettings
from mesh_pb import common_pb2, router_pb2, worker_pb2, worker_pb2_grpc
from router.placement import (
    ACTIVE_STATES,
    DEAD_STATES,
    HeldIndex,
    Key,
    WorkerVersion,
    base_replicas,
    build_routes,
    capped,
    index_held,
    load_targets,
    memory_victims,
)
from router.settings import RouterSettings

log = logging.getLogger(__name__)

VS = common_pb2.VersionState
# Errors after which another try (later, or on another worker) may succeed; anything else is the
# version's fault (bad artifact, wrong sha256, unknown format) and fails a version that never served.
_TRANSIENT = (Unavailable, DeadlineExceeded, ResourceExhausted)

TABLE_REVISION = Gauge("maas_router_table_revision", "Revision of the route table being published")
SUBSCRIBERS = Gauge("maas_router_subscribers", "Open WatchRoutes streams")
PLACEMENTS = Counter("maas_router_placements_total", "Load/unload calls to workers", ["op", "outcome"])


def _now_ms() -> int:
    return int(time.time() * 1000)


def _state(state: int) -> str:
    return common_pb2.VersionState.Name(state)  # type: ignore[arg-type]


class _WorkerClient:
    """One reused channel to a worker's control service."""

    def __init__(self, address: str, settings: MeshSettings | None) -> None:
        self.address = address
        self.channel = open_channel(address, settings)
        self.stub = worker_pb2_grpc.WorkerControlStub(self.channel)

    async def close(self) -> None:
        await self.channel.close(grace=None)


class RouterService:
    """Keeps the route table current, streams it to subscribers and places versions on workers."""

    def __init__(self, settings: RouterSettings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self._models: dict[str, common_pb2.Model] = {}
        self._workers: dict[str, worker_pb2.WorkerStats] = {}
        self._registry_failed = False
        self._recovery_until = 0.0
        # When the registry first answered (monotonic); the first table may wait for heartbeats after it.
        self._first_read: float | None = None
        self._holding_back = False
        self._held: HeldIndex = {}
        self._table = router_pb2.RouteTable()
        self._table_body = b""
        self._built = asyncio.Event()
        self._subscribers: set[asyncio.Event] = set()
        self._dirty = asyncio.Event()
        self._place_wakeup = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._op_tasks: set[asyncio.Task[None]] = set()
        self._clients: dict[str, _WorkerClient] = {}
        self._locks: dict[Key, asyncio.Lock] = {}
        # (worker_id, model, version) -> monotonic expiry: results of our own load/unload calls, trusted
        # until heartbeats (which lag by up to one beat) catch up.
        self._recent_loads: dict[tuple[str, str, int], float] = {}
        self._recent_unloads: dict[tuple[str, str, int], float] = {}
        self._retry_after: dict[tuple[str, str, int], float] = {}
        self._high_since: dict[Key, float] = {}
        self._idle_since: dict[Key, float] = {}
        # Pairs about to be unloaded, left out of the table first; the pairs the published table routes;
        # and, for pairs it no longer routes, when the first table without them was published.
        self._leaving: set[WorkerVersion] = set()
        self._routed: set[WorkerVersion] = set()
        self._unrouted_since: dict[WorkerVersion, float] = {}
        # Versions an operator unloaded through Place; placement leaves them alone until placed again
        # (version 0 = the whole model).
        self._parked: set[Key] = set()
        self._models_at = 0.0
        self._refresh_lock = asyncio.Lock()

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Builds the first table (when the registry answers) and starts the background loops."""
        try:
            await self.refresh(models=True)
        except Exception as exc:  # the registry may be down; the loops keep trying
            log.warning("first route table build failed (%s); retrying in the background", exc)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._watch_events(), name="router-events"),
            loop.create_task(self._refresh_loop(), name="router-refresh"),
        ]
        if self.settings.placement:
            self._tasks.append(loop.create_task(self._placement_loop(), name="router-placement"))

    async def stop(self) -> None:
        """Ends every subscriber stream (clients reconnect elsewhere or later) and the background loops."""
        self._stopping = True
        self._built.set()
        for ev in self._subscribers:
            ev.set()
        tasks = [*self._tasks, *self._op_tasks]
        for task in tasks:
            task.cancel()
        # The loops also end on _stopping: a library call inside one (a channel close, a Redis
        # command) can swallow the CancelledError, and a loop that kept going would hang the stop.
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=5.0)
            if pending:
                log.warning("router stop: %d background tasks did not end", len(pending))
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    # ------------------------------------------------------------------------------ the table

    @property
    def table(self) -> router_pb2.RouteTable:
        return self._table

    def mark_dirty(self) -> None:
        """Asks for a rebuild soon (registry events call this; debounced)."""
        self._dirty.set()

    async def refresh(self, *, models: bool = True) -> router_pb2.RouteTable:
        """Re-reads workers (and models), rebuilds the table and publishes it when it changed."""
        async with self._refresh_lock:
            if models:
                listed = await self.registry.list_models(include_versions=True)
                self._models = {m.name: m for m in listed}
                self._models_at = time.monotonic()
            workers = {w.worker_id: w for w in await self.registry.list_workers()}
            if self._first_read is None:
                self._first_read = time.monotonic()
            if time.monotonic() < self._recovery_until:
                # Just after an outage the registry may not list workers that are alive: keep them
                # rather than publish a table without endpoints (gateways would answer UNAVAILABLE).
                for worker_id, stats in self._workers.items():
                    workers.setdefault(worker_id, stats)
            self._workers = workers
            self._index()
            changed = self._rebuild()
        if changed:
            self._place_wakeup.set()
        await self._close_stale_clients()
        return self._table

    def _index(self) -> None:
        now = time.monotonic()
        for table in (self._recent_loads, self._recent_unloads, self._retry_after):
            for k in [k for k, exp in table.items() if exp <= now]:
                del table[k]
        self._held = index_held(self._workers, self._recent_loads, self._recent_unloads)
        held = {(wid, *key) for key, holders in self._held.items() for wid in holders}
        for entry in [e for e in self._unrouted_since if e not in held and e not in self._leaving]:
            del self._unrouted_since[entry]

    def _rebuild(self) -> bool:
        """Builds the table from the current view and publishes it when it changed (and may be sent)."""
        routes = build_routes(self._models.values(), self._workers, self._held, self._leaving)
        if not self._built.is_set() and self._settling(routes):
            return False
        changed = self._publish(routes)
        self._built.set()
        return changed

    def _settling(self, routes: list[router_pb2.ModelRoute]) -> bool:
        """True while the first table would give a READY version no endpoint and workers may still be
        rewriting their heartbeats (the registry first answered this process a moment ago: it just
        started, or started while the registry was down, whose heartbeat keys expired meanwhile).

        Gateways install a new router's first table over the one they hold (its revision is newer), so
        one sent before the heartbeats are in would fail every request; until then they keep their last
        table. A table that routes every READY version goes out at once."""
        if self._first_read is None:
            return True
        waited = time.monotonic() - self._first_read
        if waited >= self.settings.registry_recovery_grace_s:
            return False
        missing = [
            f"{mr.model}:{vr.version}"
            for mr in routes
            for vr in mr.versions
            if vr.state == VS.READY and not vr.endpoints
        ]
        if missing and not self._holding_back:
            self._holding_back = True
            log.info(
                "holding back the first route table up to %.1fs: no heartbeat shows a worker for %s yet",
                self.settings.registry_recovery_grace_s,
                ", ".join(missing),
            )
        return bool(missing)

    def _publish(self, models: list[router_pb2.ModelRoute]) -> bool:
        body = router_pb2.RouteTable(models=models).SerializeToString(deterministic=True)
        if body == self._table_body and self._built.is_set():
            return False
        now_ms = _now_ms()
        # Wall-clock based, so the tables of a restarted router are newer than the ones gateways hold.
        revision = max(self._table.revision + 1, now_ms)
        self._table = router_pb2.RouteTable(revision=revision, models=models, built_ms=now_ms)
        self._table_body = body
        TABLE_REVISION.set(revision)
        routed = {
            (e.worker_id, mr.model, vr.version) for mr in models for vr in mr.versions for e in vr.endpoints
        }
        now = time.monotonic()
        for entry in self._routed - routed:
            self._unrouted_since.setdefault(entry, now)
        for entry in routed:
            self._unrouted_since.pop(entry, None)
        self._routed = routed
        for ev in self._subscribers:
            ev.set()
        return True

    async def watch(self, subscriber: str = "") -> AsyncIterator[router_pb2.RouteTable]:
        """The current table, then every new one (at least every publish_interval_s).

        Nothing is sent before the first table is built from the registry: a gateway keeps its last
        table rather than receiving an empty one from a router that cannot read Redis yet, or one built
        before the workers' heartbeats are in (see _settling)."""
        ev = asyncio.Event()
        self._subscribers.add(ev)
        SUBSCRIBERS.set(len(self._subscribers))
        log.info("route subscriber %r connected", subscriber)
        try:
            await self._built.wait()
            while not self._stopping:
                ev.clear()
                yield self._table
                await wait_event(ev, self.settings.publish_interval_s)
        finally:
            self._subscribers.discard(ev)
            SUBSCRIBERS.set(len(self._subscribers))
            log.info("route subscriber %r disconnected", subscriber)

    # ------------------------------------------------------------------------------ background loops

    async def _watch_events(self) -> None:
        after = "$"
        while not self._stopping:
            try:
                async for event in self.registry.watch_events(after):
                    after = event.id
                    self._dirty.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("registry event watch failed (%s); retrying", exc)
                await asyncio.sleep(1.0)

    async def _refresh_loop(self) -> None:
        s = self.settings
        while not self._stopping:
            await wait_event(self._dirty, s.poll_interval_s)
            models = False
            if self._dirty.is_set():
                await asyncio.sleep(s.debounce_s)  # coalesce a burst of events into one rebuild
                self._dirty.clear()
                models = True
            elif time.monotonic() - self._models_at >= s.models_refresh_s or not self._built.is_set():
                models = True
            if self._registry_failed:
                self._recovery_until = time.monotonic() + s.registry_recovery_grace_s
            try:
                await self.refresh(models=models)
                self._registry_failed = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Redis down: keep publishing the last table, try again next tick.
                self._registry_failed = True
                log.warning("route table refresh failed (%s); keeping the last table", exc)

    async def _placement_loop(self) -> None:
        while not self._stopping:
            await wait_event(self._place_wakeup, self.settings.placement_interval_s)
            self._place_wakeup.clear()
            if not self._built.is_set():
                continue
            try:
                self.plan()
            except Exception:
                log.exception("placement pass failed")

    # ------------------------------------------------------------------------------ placement

    def holders(self, model: str, version: int, *, include_draining: bool = False) -> list[str]:
        """Workers that hold a version now (heartbeats plus the router's own recent calls)."""
        held = self._held.get((model, version), {})
        return sorted(
            wid
            for wid in held
            if wid in self._workers and (include_draining or not self._workers[wid].draining)
        )

    def _base_replicas(self, mv: common_pb2.ModelVersion) -> int:
        return base_replicas(mv, self.settings.default_min_replicas)

    def _want(self, mv: common_pb2.ModelVersion, now: float) -> int:
        """Replicas a version should have now: min_replicas, plus one while its queue stays deep."""
        key = (mv.ref.name, mv.ref.version)
        base = self._base_replicas(mv)
        holders = self.holders(*key)
        n = len(holders)
        want = base
        queue = sum(self._held[key][w].queue_depth for w in holders) if holders else 0
        if n and mv.state == VS.READY and queue / n > self.settings.scale_queue_depth:
            since = self._high_since.setdefault(key, now)
            if now - since >= self.settings.scale_after_s:
                want = max(base, n + 1)
                self._high_since[key] = now  # the next replica waits for another full period
            else:
                want = max(base, n)
        else:
            self._high_since.pop(key, None)
        return capped(want, mv)

    def plan(self) -> None:
        """One placement pass: starts the loads/unloads the current view calls for (non-blocking)."""
        now = time.monotonic()
        for name, m in self._models.items():
            if (name, 0) in self._parked:
                continue
            for mv in m.versions:
                key = (name, mv.ref.version)
                if key in self._parked:
                    continue
                lock = self._lock(key)
                if lock.locked():
                    continue  # an operation on this version is running
                if mv.state in DEAD_STATES:
                    if self.holders(*key, include_draining=True):
                        self._spawn(self._unload_version(key, reason=_state(mv.state)))
                    continue
                if mv.state not in ACTIVE_STATES:
                    continue
                want = self._want(mv, now)
                holders = self.holders(*key)
                if len(holders) < want or (mv.state != VS.READY and holders):
                    if self._candidates(key, want - len(holders), now) or holders:
                        self._spawn(self._ensure_locked(name, mv.ref.version, strict=False, want=want))
                elif len(holders) > self._base_replicas(mv):
                    self._maybe_scale_down(mv, holders, now)
        self._relieve_memory_pressure()

    def _maybe_scale_down(self, mv: common_pb2.ModelVersion, holders: list[str], now: float) -> None:
        """Unloads one extra replica once the version saw no queue for scale_down_after_s and that
        replica served no request for as long.

        Queue depth and in-flight are heartbeat snapshots: a fast model serving thousands of requests a
        second shows both at 0 nearly always, so only the replica's last request tells it is idle."""
        key = (mv.ref.name, mv.ref.version)
        held = self._held[key]
        queue = sum(held[w].queue_depth + held[w].in_flight for w in holders)
        if queue > 0:
            self._idle_since.pop(key, None)
            return
        since = self._idle_since.setdefault(key, now)
        if now - since < self.settings.scale_down_after_s:
            return
        coldest = min(holders, key=lambda w: held[w].last_used_ms)
        if _now_ms() - held[coldest].last_used_ms < self.settings.scale_down_after_s * 1000:
            return
        self._idle_since[key] = now
        self._spawn(self._unload_one(coldest, key, "idle extra replica"))

    def _relieve_memory_pressure(self) -> None:
        """On a worker above its memory budget, unloads the coldest replica that is not needed."""
        versions = {(m.name, mv.ref.version): mv for m in self._models.values() for mv in m.versions}
        busy = {key for key, lock in self._locks.items() if lock.locked()}
        victims = memory_victims(
            self._workers.values(),
            versions,
            self._held,
            pressure=self.settings.memory_pressure,
            default_min_replicas=self.settings.default_min_replicas,
            busy=busy,
            unloading={wid for wid, _model, _version in self._leaving},
        )
        for worker_id, key in victims:
            self._spawn(self._unload_one(worker_id, key, "memory pressure"))

    def _candidates(self, key: Key, count: int, now: float) -> list[str]:
        """Up to `count` live workers that do not hold the version, most free memory first."""
        model, version = key
        skip = {
            w for (w, m, v), until in self._retry_after.items() if m == model and v == version and until > now
        }
        return load_targets(self._workers.values(), self._held.get(key, {}), count, skip)

    def _lock(self, key: Key) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        async def run() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except MeshError as exc:
                log.info("placement: %s", exc)
            except Exception:
                log.exception("placement operation failed")

        task = asyncio.get_running_loop().create_task(run())
        self._op_tasks.add(task)
        task.add_done_callback(self._op_tasks.discard)

    async def _ensure_locked(
        self, model: str, version: int, *, strict: bool, want: int | None = None
    ) -> list[str]:
        async with self._lock((model, version)):
            return await self._ensure(model, version, strict=strict, want=want)

    async def _ensure(self, model: str, version: int, *, strict: bool, want: int | None = None) -> list[str]:
        """Loads a version on `want` workers (default: its min_replicas); promotes REGISTERED/LOADING to
        READY once a worker holds it. strict (the Place RPC): raise when it ends up on no worker."""
        key = (model, version)
        mv = await self.registry.get_version(model, version)  # fresh: the view may be a moment old
        if mv.state in DEAD_STATES:
            raise FailedPrecondition(f"version: {model} version {version} is {_state(mv.state)}")
        now = time.monotonic()
        holders = self.holders(model, version)
        if mv.state != VS.READY and holders:
            await self._promote(mv)
        if want is None:
            want = self._base_replicas(mv)
        if len(holders) >= want:
            return holders
        targets = self._candidates(key, want - len(holders), now)
        if not targets:
            if not holders and strict:
                raise Unavailable(f"version: no live worker can load {model} version {version}")
            return holders
        if mv.state == VS.REGISTERED:
            mv = await self.registry.set_state(model, version, VS.LOADING)
        results = await asyncio.gather(*(self._load(wid, mv) for wid in targets), return_exceptions=True)
        loaded = [wid for wid, r in zip(targets, results, strict=True) if r is None]
        errors = [r for r in results if isinstance(r, BaseException)]
        if loaded:
            if mv.state != VS.READY:
                await self._promote(mv)
            await self._refresh_quietly()
            return self.holders(model, version)
        fatal = next((e for e in errors if not isinstance(e, _TRANSIENT)), None)
        if fatal is not None:
            if mv.state in (VS.REGISTERED, VS.LOADING) and not holders:
                reason = f"load failed: {fatal}"
                await self.registry.set_state(model, version, VS.FAILED, reason)
                await self._refresh_quietly()
                raise FailedPrecondition(f"version: {model} version {version} failed to load: {fatal}")
        if holders:
            return holders
        if strict:
            first = errors[0] if errors else None
            if isinstance(first, MeshError):
                raise first
            raise Unavailable(f"version: {model} version {version} could not be loaded: {first}")
        return holders

    async def _promote(self, mv: common_pb2.ModelVersion) -> None:
        """REGISTERED/LOADING -> READY once a worker holds it; the model's first READY version is stable."""
        model, version = mv.ref.name, mv.ref.version
        try:
            if mv.state == VS.REGISTERED:
                await self.registry.set_state(model, version, VS.LOADING)
            if mv.state != VS.READY:
                await self.registry.set_state(model, version, VS.READY)
                log.info("version %s:%s is READY", model, version)
            current = await self.registry.get_model(model, include_versions=False)
            if STABLE_ALIAS not in current.aliases:
                await self.registry.set_alias(model, STABLE_ALIAS, version)
                log.info("alias %s:%s -> %s", model, STABLE_ALIAS, version)
        except FailedPrecondition as exc:  # an operator moved it meanwhile (e.g. retired)
            log.warning("could not promote %s:%s: %s", model, version, exc)

    def _client(self, worker_id: str) -> _WorkerClient:
        w = self._workers.get(worker_id)
        if w is None:
            raise Unavailable(f"worker_id: worker {worker_id!r} is not alive")
        client = self._clients.get(w.address)
        if client is None:
            client = self._clients[w.address] = _WorkerClient(w.address, self.settings)
        return client

    async def _close_stale_clients(self) -> None:
        live = {w.address for w in self._workers.values()}
        for address in [a for a in self._clients if a not in live]:
            await self._clients.pop(address).close()

    async def _load(self, worker_id: str, mv: common_pb2.ModelVersion) -> None:
        model, version = mv.ref.name, mv.ref.version
        entry = (worker_id, model, version)
        try:
            stub = self._client(worker_id).stub
            stats = await stub.LoadVersion(
                worker_pb2.LoadVersionRequest(version=mv), timeout=self.settings.load_timeout_s
            )
        except grpc.aio.AioRpcError as err:
            exc = from_rpc_error(err)
            PLACEMENTS.labels("load", "error").inc()
            self._retry_after[entry] = time.monotonic() + self.settings.retry_failed_load_s
            log.warning("loading %s:%s on %s failed: %s", model, version, worker_id, exc)
            raise exc from None
        PLACEMENTS.labels("load", "ok").inc()
        log.info("loaded %s:%s on %s", model, version, worker_id)
        self._recent_unloads.pop(entry, None)
        self._recent_loads[entry] = time.monotonic() + self.settings.load_grace_s
        self._note_stats(stats)

    async def _unload_one(self, worker_id: str, key: Key, reason: str) -> None:
        async with self._lock(key):
            await self._unload(worker_id, key, reason)
        await self._refresh_quietly()

    async def _unload_version(self, key: Key, reason: str) -> list[str]:
        async with self._lock(key):
            holders = self.holders(*key, include_draining=True)
            await asyncio.gather(*(self._unload(w, key, reason) for w in holders), return_exceptions=True)
        await self._refresh_quietly()
        return self.holders(*key, include_draining=True)

    async def _unload(self, worker_id: str, key: Key, reason: str) -> None:
        """Takes the version out of the table for that worker, waits unload_grace_s, then unloads it
        (a failed unload puts the pair back in the table at the next rebuild)."""
        model, version = key
        entry = (worker_id, model, version)
        self._leaving.add(entry)
        try:
            await self._leave_table(entry)
            stub = self._client(worker_id).stub
            stats = await stub.UnloadVersion(
                worker_pb2.UnloadVersionRequest(ref=common_pb2.ModelRef(name=model, version=version)),
                timeout=self.settings.load_timeout_s,
            )
        except grpc.aio.AioRpcError as err:
            exc = from_rpc_error(err)
            if exc.code != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: it was not loaded there any more
                PLACEMENTS.labels("unload", "error").inc()
                log.warning("unloading %s:%s from %s failed: %s", model, version, worker_id, exc)
                raise exc from None
            stats = None
        finally:
            self._leaving.discard(entry)
        PLACEMENTS.labels("unload", "ok").inc()
        log.info("unloaded %s:%s from %s (%s)", model, version, worker_id, reason)
        self._recent_loads.pop(entry, None)
        self._recent_unloads[entry] = time.monotonic() + self.settings.load_grace_s
        if stats is not None:
            self._note_stats(stats)

    async def _leave_table(self, entry: WorkerVersion) -> None:
        """Returns once the first published table that no longer routes `entry` is unload_grace_s old.

        A pair the table still routes is taken out of it now (the caller put it in _leaving). A pair
        this process never saw leave (a version retired before a router restart) waits the full grace
        from now: gateways may still hold a table of the previous router that routes it."""
        if entry in self._routed:
            self._rebuild()
        since = self._unrouted_since.setdefault(entry, time.monotonic())
        await asyncio.sleep(max(0.0, since + self.settings.unload_grace_s - time.monotonic()))

    def _note_stats(self, stats: worker_pb2.WorkerStats) -> None:
        """A control call's answer is the freshest view of that worker's memory."""
        w = self._workers.get(stats.worker_id)
        if w is not None and stats.worker_id:
            w.memory_used_bytes = stats.memory_used_bytes
            w.memory_total_bytes = stats.memory_total_bytes or w.memory_total_bytes

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh(models=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("route table refresh failed (%s)", exc)

    # ------------------------------------------------------------------------------ Place RPC

    async def place(self, model: str, version: int, unload: bool) -> list[str]:
        """Loads a version now (version 0: every active version of the model) or unloads it everywhere.

        Returns the workers holding it afterwards."""
        await self.refresh(models=True)
        m = self._models.get(model)
        if m is None:
            raise ModelNotFound(model)
        if version:
            versions = [mv for mv in m.versions if mv.ref.version == version]
            if not versions:
                raise VersionNotFound(model, version)
        else:
            versions = list(m.versions)
        if unload:
            self._parked.add((model, version))
            for mv in versions:
                await self._unload_version((model, mv.ref.version), reason="unload requested")
            return sorted({w for mv in versions for w in self.holders(model, mv.ref.version)})
        if version and (model, 0) in self._parked:
            # The whole model was unloaded; placing one version brings back only that one.
            self._parked.discard((model, 0))
            self._parked.update((model, mv.ref.version) for mv in m.versions if mv.ref.version != version)
        self._parked.discard((model, version))
        for mv in versions:
            self._parked.discard((model, mv.ref.version))
        if not version:
            versions = [mv for mv in versions if mv.state in ACTIVE_STATES]
            if not versions:
                raise FailedPrecondition(f"model_name: model '{model}' has no version that can be loaded")
        elif versions[0].state in DEAD_STATES:
            raise FailedPrecondition(f"version: {model} version {version} is {_state(versions[0].state)}")
        holders: set[str] = set()
        for mv in versions:
            holders.update(await self._ensure_locked(model, mv.ref.version, strict=True))
        await self.refresh(models=True)
        return sorted(holders)
