"""Placement policy (pure functions): held index, route table, load targets, memory-pressure victims."""

from __future__ import annotations

from mesh_pb import common_pb2, worker_pb2
from router.placement import (
    Held,
    base_replicas,
    build_routes,
    capped,
    index_held,
    load_targets,
    memory_victims,
)

VS = common_pb2.VersionState


def _worker(
    wid: str,
    loaded: dict[tuple[str, int], tuple[int, int]] | None = None,
    *,
    budget: int = 1000,
    used: int = 0,
    draining: bool = False,
) -> worker_pb2.WorkerStats:
    """loaded: (model, version) -> (queue_depth, last_used_ms)."""
    return worker_pb2.WorkerStats(
        worker_id=wid,
        address=f"{wid}:1",
        device="cpu",
        memory_budget_bytes=budget,
        memory_used_bytes=used,
        draining=draining,
        loaded=[
            worker_pb2.LoadedVersion(
                ref=common_pb2.ModelRef(name=m, version=v), queue_depth=q, last_used_ms=t, memory_bytes=100
            )
            for (m, v), (q, t) in (loaded or {}).items()
        ],
    )


def _version(model: str, v: int, state: int = VS.READY, mn: int = 0, mx: int = 0) -> common_pb2.ModelVersion:
    return common_pb2.ModelVersion(
        ref=common_pb2.ModelRef(name=model, version=v),
        state=state,  # type: ignore[arg-type]
        min_replicas=mn,
        max_replicas=mx,
    )


def test_index_held_applies_recent_calls() -> None:
    workers = {
        "a": _worker("a", {("digits", 1): (3, 10)}),
        "b": _worker("b", {("digits", 1): (0, 5)}),
    }
    held = index_held(
        workers, recent_loads=[("a", "digits", 2), ("gone", "digits", 2)], recent_unloads=[("b", "digits", 1)]
    )
    assert held[("digits", 1)] == {"a": Held(3, 0, 100, 10)}
    assert held[("digits", 2)] == {"a": Held()}  # the worker that left is not a holder


def test_build_routes_skips_dead_versions_and_marks_draining() -> None:
    model = common_pb2.Model(
        name="digits",
        aliases={"stable": 1},
        traffic=[common_pb2.TrafficWeight(version=1, weight=1.0)],
        versions=[
            _version("digits", 1),
            _version("digits", 2, VS.RETIRED),
            _version("digits", 3, VS.REGISTERED),
        ],
    )
    workers = {
        "a": _worker("a", {("digits", 1): (2, 0)}),
        "b": _worker("b", {("digits", 1): (0, 0)}, draining=True),
    }
    (route,) = build_routes([model], workers, index_held(workers))
    assert dict(route.aliases) == {"stable": 1}
    assert [(t.version, t.weight) for t in route.traffic] == [(1, 1.0)]
    assert [vr.version for vr in route.versions] == [1, 3]
    eps = {e.worker_id: (e.healthy, e.queue_depth, e.address) for e in route.versions[0].endpoints}
    assert eps == {"a": (True, 2, "a:1"), "b": (False, 0, "b:1")}
    assert list(route.versions[1].endpoints) == []
    # A pair about to be unloaded leaves the table while the worker still holds it.
    (route,) = build_routes([model], workers, index_held(workers), hidden={("a", "digits", 1)})
    assert [e.worker_id for e in route.versions[0].endpoints] == ["b"]


def test_replica_counts() -> None:
    assert base_replicas(_version("m", 1)) == 1
    assert base_replicas(_version("m", 1), default_min_replicas=2) == 2
    assert base_replicas(_version("m", 1, mn=3, mx=2)) == 2
    assert capped(5, _version("m", 1, mx=3)) == 3
    assert capped(5, _version("m", 1)) == 5


def test_load_targets_prefers_free_memory_and_skips() -> None:
    workers = [
        _worker("full", used=900),
        _worker("free", used=100),
        _worker("mid", used=500),
        _worker("drain", used=0, draining=True),
        _worker("holder", used=0),
    ]
    assert load_targets(workers, {"holder"}, 2) == ["free", "mid"]
    assert load_targets(workers, {"holder"}, 5, skip={"free"}) == ["mid", "full"]
    assert load_targets(workers, set(), 0) == []


def test_memory_victims_picks_coldest_surplus() -> None:
    versions = {
        ("digits", 1): _version("digits", 1),
        ("digits", 2): _version("digits", 2),
        ("digits", 3): _version("digits", 3, VS.RETIRED),
        ("enc", 1): _version("enc", 1),
    }
    hot = _worker(
        "hot",
        {("digits", 1): (0, 50), ("digits", 2): (0, 10), ("enc", 1): (0, 1)},
        used=950,
    )
    other = _worker("other", {("digits", 1): (0, 0), ("digits", 2): (0, 0)}, used=100)
    workers = [hot, other]
    held = index_held({w.worker_id: w for w in workers})
    # enc:1 is the coldest but its only replica; digits:2 (last used 10) is the coldest surplus one.
    assert memory_victims(workers, versions, held, pressure=0.9) == [("hot", ("digits", 2))]
    # A busy version (operation running) is left alone; nothing under pressure -> nothing.
    assert memory_victims(workers, versions, held, pressure=0.9, busy={("digits", 2)}) == [
        ("hot", ("digits", 1))
    ]
    assert memory_victims(workers, versions, held, pressure=0.99) == []
    # A worker with an unload already under way gets no second one before that one frees its memory.
    assert memory_victims(workers, versions, held, pressure=0.9, unloading={"hot"}) == []
    # A retired version is always surplus.
    hot2 = _worker("hot", {("digits", 3): (0, 99), ("enc", 1): (0, 1)}, used=950)
    assert memory_victims([hot2], versions, index_held({"hot": hot2}), pressure=0.9) == [
        ("hot", ("digits", 3))
    ]
