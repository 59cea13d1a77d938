"""Picker: resolves a request's version and picks a worker from the latest route table (transport-free)."""

from __future__ import annotations

import bisect
import hashlib
import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from mesh.errors import InvalidVersion, ModelNotFound, Unavailable, VersionNotFound
from mesh.versions import version_number
from mesh_pb import common_pb2, router_pb2

logger = logging.getLogger(__name__)

READY = common_pb2.READY
STABLE_ALIAS = "stable"
_HASH_SCALE = float(1 << 64)


class WorkerLoad:
    """Per-worker state the picker keeps across route tables: local in-flight count and ejection."""

    __slots__ = ("ejected_until", "in_flight", "seen_down", "worker_id")

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        # Requests this process sent to the worker and has not released yet (all versions together).
        self.in_flight = 0
        # time.monotonic() until which the worker is skipped; 0 = not ejected.
        self.ejected_until = 0.0
        # Set when a table after the ejection showed the worker unhealthy or absent; the next table that
        # shows it healthy again ends the ejection early (it came back, e.g. restarted).
        self.seen_down = False

    def available(self, now: float) -> bool:
        return self.ejected_until <= now


class Endpoint:
    """One worker serving one version, as handed out by `Picker.acquire`."""

    __slots__ = ("address", "device", "healthy", "load", "model", "queue_depth", "version", "worker_id")

    def __init__(
        self,
        model: str,
        version: int,
        worker_id: str,
        address: str,
        device: str,
        healthy: bool,
        queue_depth: int,
        load: WorkerLoad,
    ) -> None:
        self.model = model
        self.version = version
        self.worker_id = worker_id
        self.address = address
        self.device = device
        self.healthy = healthy
        # Requests queued for this version on the worker at its last heartbeat.
        self.queue_depth = queue_depth
        self.load = load

    @property
    def in_flight(self) -> int:
        return self.load.in_flight

    def __repr__(self) -> str:
        return (
            f"Endpoint({self.model}:{self.version} @ {self.worker_id} {self.address}, "
            f"in_flight={self.load.in_flight}, queue_depth={self.queue_depth}, healthy={self.healthy})"
        )


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """What the table says about one version (for metadata and readiness answers)."""

    model: str
    version: int
    state: int
    signature: common_pb2.Signature
    batching: common_pb2.BatchingConfig
    endpoints: tuple[Endpoint, ...]

    @property
    def ready(self) -> bool:
        """READY in the registry and at least one healthy endpoint in the table."""
        return self.state == READY and any(e.healthy for e in self.endpoints)


class _VersionEntry:
    __slots__ = ("healthy", "info", "state", "version")

    def __init__(self, info: VersionInfo) -> None:
        self.info = info
        self.version = info.version
        self.state = info.state
        # Endpoints the table reports healthy; ejection/exclusion are checked per pick.
        self.healthy: tuple[Endpoint, ...] = tuple(e for e in info.endpoints if e.healthy)


class _ModelEntry:
    __slots__ = (
        "aliases",
        "cum_weights",
        "latest_ready",
        "name",
        "route",
        "stable",
        "total",
        "traffic_versions",
        "versions",
    )

    def __init__(self, route: router_pb2.ModelRoute, loads: dict[str, WorkerLoad]) -> None:
        self.name = route.model
        self.route = route
        self.aliases: dict[str, int] = dict(route.aliases)
        self.versions: dict[int, _VersionEntry] = {}
        for vr in route.versions:
            eps = tuple(
                Endpoint(
                    model=route.model,
                    version=vr.version,
                    worker_id=e.worker_id,
                    address=e.address,
                    device=e.device,
                    healthy=e.healthy,
                    queue_depth=e.queue_depth,
                    load=loads[e.worker_id],
                )
                for e in vr.endpoints
            )
            info = VersionInfo(route.model, vr.version, vr.state, vr.signature, vr.batching, eps)
            self.versions[vr.version] = _VersionEntry(info)
        # Traffic split: cumulative weights over the legs that name a READY version with weight > 0,
        # precomputed once so a pick is one random number and one bisect.
        legs = [
            (t.version, t.weight)
            for t in route.traffic
            if t.weight > 0 and t.version in self.versions and self.versions[t.version].state == READY
        ]
        self.cum_weights: list[float] = []
        self.total = 0.0
        self.traffic_versions: list[int] = []
        for v, w in legs:
            self.total += w
            self.cum_weights.append(self.total)
            self.traffic_versions.append(v)
        stable = self.aliases.get(STABLE_ALIAS)
        self.stable = stable if stable in self.versions and self.versions[stable].state == READY else None
        ready = [v for v, e in self.versions.items() if e.state == READY]
        self.latest_ready = max(ready) if ready else None


def request_fraction(request_id: str) -> float:
    """Stable position of a request id in [0, 1): the same id always lands on the same traffic leg."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _HASH_SCALE


class Picker:
    """Holds the latest route table; resolves versions and picks endpoints by power of two choices.

    Not thread-safe: use it from one event loop (the gateway's). Every method is O(1) in the number of
    models and O(replicas) at worst in the number of endpoints of one version.
    """

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._models: dict[str, _ModelEntry] = {}
        self._loads: dict[str, WorkerLoad] = {}
        self._table = router_pb2.RouteTable()
        self._has_table = False

    # ----------------------------------------------------------------------------------- the table

    @property
    def table(self) -> router_pb2.RouteTable:
        """The table in use (empty before the first one arrives)."""
        return self._table

    @property
    def revision(self) -> int:
        return self._table.revision

    @property
    def has_table(self) -> bool:
        return self._has_table

    def set_table(self, table: router_pb2.RouteTable, *, force: bool = False) -> bool:
        """Installs a new table; an older revision is ignored unless `force` (first table of a new stream,
        e.g. after a router restart). Returns True when the table was installed."""
        if self._has_table and not force and table.revision < self._table.revision:
            logger.debug("ignoring route table revision %s < %s", table.revision, self._table.revision)
            return False
        now = time.monotonic()
        present: dict[str, bool] = {}
        for mr in table.models:
            for vr in mr.versions:
                for e in vr.endpoints:
                    present[e.worker_id] = present.get(e.worker_id, False) or e.healthy
        loads: dict[str, WorkerLoad] = {}
        for wid, healthy in present.items():
            load = self._loads.get(wid) or WorkerLoad(wid)
            if load.ejected_until > now:
                if not healthy:
                    load.seen_down = True
                elif load.seen_down:
                    load.ejected_until = 0.0
                    load.seen_down = False
            loads[wid] = load
        # Keep state of workers that left the table while requests to them are still in flight or
        # they are ejected, so a worker that comes straight back stays ejected until its timer ends.
        for wid, load in self._loads.items():
            if wid not in loads and (load.in_flight > 0 or load.ejected_until > now):
                load.seen_down = True
                loads[wid] = load
        self._models = {mr.model: _ModelEntry(mr, loads) for mr in table.models}
        self._loads = loads
        self._table = table
        self._has_table = True
        return True

    def models(self) -> list[str]:
        return sorted(self._models)

    def model_route(self, model: str) -> router_pb2.ModelRoute:
        """The table's entry for a model (aliases, traffic, versions); ModelNotFound when absent."""
        return self._model(model).route

    def version_info(self, model: str, version: int) -> VersionInfo:
        """The table's entry for one version; ModelNotFound / VersionNotFound when absent."""
        entry = self._model(model).versions.get(version)
        if entry is None:
            raise VersionNotFound(model, str(version))
        return entry.info

    # ----------------------------------------------------------------------------------- resolution

    def resolve(self, model: str, version: str = "", request_id: str = "") -> int:
        """Turns a request's model version string into a version id.

        "3" = that version; an alias name ("stable", "canary") = its version; "" = the model's traffic
        split (sticky per request id when one is given, else random), else the `stable` alias, else the
        latest READY version. With "", a chosen version that has no usable endpoint falls back to another
        one that has, so a dead canary does not fail requests that named no version.
        Raises ModelNotFound / VersionNotFound, InvalidVersion for a string that is neither a version
        number nor an alias, and Unavailable for "" when the model has versions but none is READY yet;
        readiness of a named version is checked by `acquire` (Unavailable).
        """
        m = self._models.get(model)
        if m is None:
            raise ModelNotFound(model)
        if version:
            v = version_number(version)
            if v is None:
                v = m.aliases.get(version)
                if v is None:
                    raise InvalidVersion(model, version)
            if v not in m.versions:
                raise VersionNotFound(model, version)
            return v
        chosen = self._policy_version(m, request_id)
        if chosen is None:
            if m.versions:  # registered or loading, not READY yet: worth a retry later
                raise Unavailable(f"model_version: model '{model}' has no READY version yet")
            raise VersionNotFound(model, "latest READY")
        if self._usable(m.versions[chosen]):
            return chosen
        return self._fallback(m, chosen)

    def _policy_version(self, m: _ModelEntry, request_id: str) -> int | None:
        if m.total > 0:
            u = request_fraction(request_id) if request_id else self._rng.random()
            i = bisect.bisect_right(m.cum_weights, u * m.total)
            return m.traffic_versions[min(i, len(m.traffic_versions) - 1)]
        if m.stable is not None:
            return m.stable
        return m.latest_ready

    def _fallback(self, m: _ModelEntry, chosen: int) -> int:
        candidates = [*m.traffic_versions]
        if m.stable is not None:
            candidates.append(m.stable)
        candidates.extend(sorted((v for v, e in m.versions.items() if e.state == READY), reverse=True))
        for v in candidates:
            if v != chosen and self._usable(m.versions[v]):
                return v
        return chosen

    def _usable(self, entry: _VersionEntry) -> bool:
        if entry.state != READY:
            return False
        now = time.monotonic()
        return any(e.load.ejected_until <= now for e in entry.healthy)

    # ----------------------------------------------------------------------------------- picking

    def acquire(self, model: str, version: int, exclude: set[str] | frozenset[str] = frozenset()) -> Endpoint:
        """Picks the less loaded of two random healthy endpoints of a version and counts one request in
        flight on it; call `release` when the request ends (or use `use`). `exclude` holds worker ids
        already tried. Ejected endpoints are passed over while another one is usable. Raises
        ModelNotFound / VersionNotFound / Unavailable."""
        m = self._models.get(model)
        if m is None:
            raise ModelNotFound(model)
        entry = m.versions.get(version)
        if entry is None:
            raise VersionNotFound(model, str(version))
        if entry.state != READY:
            state = common_pb2.VersionState.Name(entry.state)
            raise Unavailable(f"version: {model} version {version} is not ready ({state})")
        ep = self._pick(entry.healthy, exclude)
        if ep is None:
            # Every healthy replica of the version is ejected: try the least loaded one not excluded
            # anyway. Ejection steers traffic to the other replicas; where none is left, refusing every
            # request until the timer ends would turn one transient failure of a lone replica into
            # seconds of outage (a dead one fails the request fast either way). While one is usable
            # but excluded (the caller wants another worker), the answer stays Unavailable.
            ejected = [] if self._usable(entry) else [e for e in entry.healthy if e.worker_id not in exclude]
            if not ejected:
                if not entry.info.endpoints:
                    raise Unavailable(
                        f"version: {model} version {version} is not loaded on any worker (unloaded, or "
                        "being placed)"
                    )
                raise Unavailable(f"version: no healthy worker serves {model} version {version}")
            ep = min(ejected, key=_cost)
        ep.load.in_flight += 1
        return ep

    def _pick(self, eps: tuple[Endpoint, ...], exclude: set[str] | frozenset[str]) -> Endpoint | None:
        n = len(eps)
        if n == 0:
            return None
        now = time.monotonic()
        if n == 1:
            e = eps[0]
            return e if e.load.ejected_until <= now and e.worker_id not in exclude else None
        # Fast path: two distinct random endpoints, both usable.
        rng = self._rng
        i = int(rng.random() * n)
        j = int(rng.random() * (n - 1))
        if j >= i:
            j += 1
        a, b = eps[i], eps[j]
        a_ok = a.load.ejected_until <= now and a.worker_id not in exclude
        b_ok = b.load.ejected_until <= now and b.worker_id not in exclude
        if a_ok and b_ok:
            return a if _cost(a) <= _cost(b) else b
        # Slow path (an ejected or excluded worker was drawn): choose among the usable ones.
        usable = [e for e in eps if e.load.ejected_until <= now and e.worker_id not in exclude]
        if not usable:
            return None
        if len(usable) == 1:
            return usable[0]
        a, b = rng.sample(usable, 2)
        return a if _cost(a) <= _cost(b) else b

    def release(self, endpoint: Endpoint) -> None:
        """Ends one request acquired on `endpoint`."""
        if endpoint.load.in_flight > 0:
            endpoint.load.in_flight -= 1

    @contextmanager
    def use(
        self, model: str, version: int, exclude: set[str] | frozenset[str] = frozenset()
    ) -> Iterator[Endpoint]:
        """`with picker.use(model, version) as ep:` acquires an endpoint and releases it on exit."""
        ep = self.acquire(model, version, exclude)
        try:
            yield ep
        finally:
            self.release(ep)

    def eject(self, worker_id: str, seconds: float = 5.0) -> None:
        """Skips a worker (it answered UNAVAILABLE or its connection died) for `seconds`, or until a later
        table shows it unhealthy and then healthy again, while another replica can take its requests."""
        load = self._loads.get(worker_id)
        if load is None:
            load = self._loads[worker_id] = WorkerLoad(worker_id)
        now = time.monotonic()
        if load.ejected_until <= now:  # once per ejection, not per request that extends it
            logger.info("ejected worker %s for %.1fs", worker_id, seconds)
        load.ejected_until = max(load.ejected_until, now + seconds)
        load.seen_down = False

    def is_ejected(self, worker_id: str) -> bool:
        load = self._loads.get(worker_id)
        return load is not None and load.ejected_until > time.monotonic()

    def in_flight(self, worker_id: str) -> int:
        """Requests this process has in flight on a worker."""
        load = self._loads.get(worker_id)
        return load.in_flight if load is not None else 0

    def _model(self, model: str) -> _ModelEntry:
        m = self._models.get(model)
        if m is None:
            raise ModelNotFound(model)
        return m


def _cost(e: Endpoint) -> int:
    return e.load.in_flight + e.queue_depth
