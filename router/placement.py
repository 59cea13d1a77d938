"""Placement policy as pure functions: who holds what, the route table, where to load, what to evict."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from mesh_pb import common_pb2, router_pb2, worker_pb2

VS = common_pb2.VersionState
# Versions that belong in the table and on workers.
ACTIVE_STATES = frozenset({VS.REGISTERED, VS.LOADING, VS.READY})
# Versions that must leave every worker.
DEAD_STATES = frozenset({VS.FAILED, VS.REJECTED, VS.RETIRED})

Key = tuple[str, int]
# (worker_id, model, version)
WorkerVersion = tuple[str, str, int]


@dataclass
class Held:
    """One worker holding one version, as the router currently believes."""

    queue_depth: int = 0
    in_flight: int = 0
    memory_bytes: int = 0
    last_used_ms: int = 0


HeldIndex = dict[Key, dict[str, Held]]


def index_held(
    workers: Mapping[str, worker_pb2.WorkerStats],
    recent_loads: Iterable[WorkerVersion] = (),
    recent_unloads: Iterable[WorkerVersion] = (),
) -> HeldIndex:
    """(model, version) -> {worker_id: Held} from heartbeats, corrected by the router's own recent
    load/unload calls (heartbeats lag by up to one beat)."""
    held: HeldIndex = {}
    for wid, w in workers.items():
        for lv in w.loaded:
            held.setdefault((lv.ref.name, lv.ref.version), {})[wid] = Held(
                lv.queue_depth, lv.in_flight, lv.memory_bytes, lv.last_used_ms
            )
    for wid, model, version in recent_loads:
        if wid in workers:
            held.setdefault((model, version), {}).setdefault(wid, Held())
    for wid, model, version in recent_unloads:
        holders = held.get((model, version))
        if holders is not None:
            holders.pop(wid, None)
    return held


def build_routes(
    models: Iterable[common_pb2.Model],
    workers: Mapping[str, worker_pb2.WorkerStats],
    held: HeldIndex,
    hidden: Collection[WorkerVersion] = (),
) -> list[router_pb2.ModelRoute]:
    """The route table's models: active versions with their endpoints (draining workers unhealthy).

    `hidden` pairs are left out although the worker still holds them: the router is about to unload
    them, and gateways must stop sending there before the worker stops serving."""
    routes = []
    for m in sorted(models, key=lambda m: m.name):
        route = router_pb2.ModelRoute(model=m.name, aliases=m.aliases, traffic=m.traffic)
        for mv in m.versions:
            if mv.state not in ACTIVE_STATES:
                continue
            vr = route.versions.add(
                version=mv.ref.version, state=mv.state, signature=mv.signature, batching=mv.batching
            )
            for wid, h in sorted(held.get((m.name, mv.ref.version), {}).items()):
                w = workers.get(wid)
                if w is None or (wid, m.name, mv.ref.version) in hidden:
                    continue
                vr.endpoints.add(
                    worker_id=wid,
                    address=w.address,
                    healthy=not w.draining,
                    queue_depth=h.queue_depth,
                    device=w.device,
                )
        routes.append(route)
    return routes


def base_replicas(mv: common_pb2.ModelVersion, default_min_replicas: int = 1) -> int:
    """Replicas a version keeps at rest: min_replicas (or the default), at least 1, at most max_replicas."""
    base = max(1, mv.min_replicas or default_min_replicas)
    return min(base, mv.max_replicas) if mv.max_replicas else base


def capped(want: int, mv: common_pb2.ModelVersion) -> int:
    return int(max(1, min(want, mv.max_replicas or math.inf)))


def load_targets(
    workers: Iterable[worker_pb2.WorkerStats],
    holders: Collection[str],
    count: int,
    skip: Collection[str] = (),
) -> list[str]:
    """Up to `count` live (not draining) workers that do not hold the version yet: most free memory
    first, then fewest loaded versions."""
    if count <= 0:
        return []
    options = []
    for w in workers:
        if w.draining or w.worker_id in holders or w.worker_id in skip:
            continue
        free = (w.memory_budget_bytes or w.memory_total_bytes) - w.memory_used_bytes
        options.append((-free, len(w.loaded), w.worker_id))
    options.sort()
    return [wid for _, _, wid in options[:count]]


def memory_victims(
    workers: Iterable[worker_pb2.WorkerStats],
    versions: Mapping[Key, common_pb2.ModelVersion],
    held: HeldIndex,
    *,
    pressure: float,
    default_min_replicas: int = 1,
    busy: Collection[Key] = (),
    unloading: Collection[str] = (),
) -> list[tuple[str, Key]]:
    """For each worker above `pressure` x its memory budget, its coldest idle version that is not needed
    there: not active any more, or a replica above the version's base count. One per worker and pass;
    none on a worker in `unloading` (an unload is already under way there, waiting out its grace, and
    the memory it frees shows only once it is done)."""
    workers = list(workers)
    live = {w.worker_id for w in workers if not w.draining}
    out = []
    for w in workers:
        budget = w.memory_budget_bytes
        if w.draining or w.worker_id in unloading or budget <= 0 or w.memory_used_bytes <= budget * pressure:
            continue
        surplus = []
        for lv in w.loaded:
            key = (lv.ref.name, lv.ref.version)
            mv = versions.get(key)
            if mv is None or key in busy or lv.queue_depth or lv.in_flight:
                continue
            live_holders = sum(1 for wid in held.get(key, {}) if wid in live)
            if mv.state not in ACTIVE_STATES or live_holders > base_replicas(mv, default_min_replicas):
                surplus.append(lv)
        if surplus:
            coldest = min(surplus, key=lambda lv: lv.last_used_ms)
            out.append((w.worker_id, (coldest.ref.name, coldest.ref.version)))
    return out
