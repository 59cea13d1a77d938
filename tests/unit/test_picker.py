"""Picker: version resolution (explicit, alias, weighted split, stickiness) and power-of-two-choices picks."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping

import grpc
import pytest

from mesh.errors import InvalidVersion, ModelNotFound, Unavailable, VersionNotFound
from mesh.versions import version_number
from mesh_pb import common_pb2, router_pb2
from router.picker import Picker, request_fraction

READY = common_pb2.READY


def _ep(worker: str, *, healthy: bool = True, queue: int = 0) -> router_pb2.Endpoint:
    return router_pb2.Endpoint(
        worker_id=worker, address=f"127.0.0.1:{abs(hash(worker)) % 50000 + 1000}", healthy=healthy,
        queue_depth=queue, device="cpu",
    )  # fmt: skip


def _table(
    revision: int = 1,
    *,
    versions: dict[int, list[router_pb2.Endpoint]] | None = None,
    states: Mapping[int, int] | None = None,
    aliases: dict[str, int] | None = None,
    traffic: list[tuple[int, float]] | None = None,
    model: str = "digits",
) -> router_pb2.RouteTable:
    versions = versions if versions is not None else {1: [_ep("w1")]}
    states = states or {}
    route = router_pb2.ModelRoute(
        model=model,
        aliases=aliases or {},
        traffic=[common_pb2.TrafficWeight(version=v, weight=w) for v, w in traffic or []],
        versions=[
            router_pb2.VersionRoute(version=v, state=states.get(v, READY), endpoints=eps)  # type: ignore[arg-type]
            for v, eps in versions.items()
        ],
    )
    return router_pb2.RouteTable(revision=revision, models=[route])


def _picker(table: router_pb2.RouteTable, seed: int = 7) -> Picker:
    p = Picker(rng=random.Random(seed))
    assert p.set_table(table)
    return p


def test_explicit_version_alias_and_unknowns() -> None:
    p = _picker(_table(versions={1: [_ep("w1")], 2: [_ep("w2")]}, aliases={"stable": 1, "canary": 2}))
    assert p.resolve("digits", "2") == 2
    assert p.resolve("digits", "stable") == 1
    assert p.resolve("digits", "canary") == 2
    # No traffic split: the stable alias.
    assert p.resolve("digits", "") == 1
    with pytest.raises(ModelNotFound):
        p.resolve("nope", "")
    with pytest.raises(VersionNotFound):
        p.resolve("digits", "9")
    # Neither a number nor an alias: INVALID_ARGUMENT, as Triton answers for a version it cannot parse
    # (this was NOT_FOUND before; a well-formed number that is not there stays NOT_FOUND).
    with pytest.raises(InvalidVersion, match=r"^model_version: 'prod' is neither"):
        p.resolve("digits", "prod")


@pytest.mark.parametrize("version", ["²", "１", "١", "9" * 4301, "-1", "+1", " 1", "1.0", "0x1", str(2**63)])
def test_unparseable_versions_are_invalid_argument(version: str) -> None:
    # str.isdigit() takes "²", int() reads "１" and "١" as 1 and refuses more than 4300 digits.
    p = _picker(_table(versions={1: [_ep("w1")]}, aliases={"stable": 1}))
    assert version_number(version) is None
    with pytest.raises(InvalidVersion, match=r"^model_version: ") as err:
        p.resolve("digits", version)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and len(err.value.message) < 200


def test_version_numbers() -> None:
    assert [version_number(v) for v in ("1", "007", "0", str(2**63 - 1))] == [1, 7, 0, 2**63 - 1]
    assert version_number("") is None and version_number("stable") is None
    p = _picker(_table(versions={7: [_ep("w1")]}))
    assert p.resolve("digits", "007") == 7
    with pytest.raises(VersionNotFound):
        p.resolve("digits", str(2**63 - 1))


def test_latest_ready_without_stable_or_traffic() -> None:
    states = {3: common_pb2.LOADING}
    p = _picker(_table(versions={1: [_ep("w1")], 2: [_ep("w1")], 3: []}, states=states))
    assert p.resolve("digits", "") == 2
    # The explicit non-ready version resolves, but acquiring it is UNAVAILABLE.
    assert p.resolve("digits", "3") == 3
    with pytest.raises(Unavailable):
        p.acquire("digits", 3)
    # Only a loading version: unversioned requests are UNAVAILABLE (retry later), not NOT_FOUND.
    p.set_table(_table(2, versions={3: []}, states=states))
    with pytest.raises(Unavailable):
        p.resolve("digits", "")


def test_weighted_split_within_five_percent() -> None:
    p = _picker(_table(versions={1: [_ep("w1")], 2: [_ep("w2")]}, traffic=[(1, 90.0), (2, 10.0)]))
    n = 2000
    random_counts = Counter(p.resolve("digits", "") for _ in range(n))
    assert abs(random_counts[2] / n - 0.10) <= 0.05
    sticky_counts = Counter(p.resolve("digits", "", f"req-{i}") for i in range(n))
    assert abs(sticky_counts[2] / n - 0.10) <= 0.05
    assert abs(sticky_counts[1] / n - 0.90) <= 0.05


def test_sticky_per_request_id_across_tables() -> None:
    table = _table(versions={1: [_ep("w1")], 2: [_ep("w2")]}, traffic=[(1, 50.0), (2, 50.0)])
    p = _picker(table)
    first = {f"id-{i}": p.resolve("digits", "", f"id-{i}") for i in range(200)}
    assert set(first.values()) == {1, 2}
    # The same ids land on the same versions again, also after a new revision of the same table.
    table2 = router_pb2.RouteTable()
    table2.CopyFrom(table)
    table2.revision = 2
    assert p.set_table(table2)
    assert all(p.resolve("digits", "", rid) == v for rid, v in first.items())
    # The position of an id is a pure function of the id.
    assert request_fraction("abc") == request_fraction("abc")
    assert 0.0 <= request_fraction("abc") < 1.0


def test_traffic_skips_version_without_endpoints() -> None:
    # The canary lost its only worker: requests that name no version go to the other leg.
    versions = {1: [_ep("w1")], 2: [_ep("w2", healthy=False)]}
    p = _picker(_table(versions=versions, traffic=[(1, 50.0), (2, 50.0)]))
    assert {p.resolve("digits", "", f"r{i}") for i in range(100)} == {1}
    # Naming the version explicitly still reaches it, and it is unavailable.
    with pytest.raises(Unavailable, match="no healthy worker serves digits version 2"):
        p.acquire("digits", p.resolve("digits", "2"))
    # A version on no worker at all (an operator unloaded it) says so.
    unplaced = _picker(_table(versions={1: [_ep("w1")], 3: []}))
    with pytest.raises(Unavailable, match="digits version 3 is not loaded on any worker"):
        unplaced.acquire("digits", 3)


def test_p2c_prefers_less_loaded() -> None:
    p = _picker(_table(versions={1: [_ep("busy", queue=50), _ep("idle", queue=0)]}))
    picks: Counter[str] = Counter()
    for _ in range(200):
        ep = p.acquire("digits", 1)
        picks[ep.worker_id] += 1
        p.release(ep)
    assert picks == {"idle": 200}
    # Local in-flight counts too: with equal reported queues the picker spreads by in-flight.
    p = _picker(_table(versions={1: [_ep("a"), _ep("b")]}))
    held = [p.acquire("digits", 1) for _ in range(10)]
    assert Counter(e.worker_id for e in held) == {"a": 5, "b": 5}
    for e in held:
        p.release(e)
    assert p.in_flight("a") == 0 and p.in_flight("b") == 0


def test_p2c_spreads_among_many() -> None:
    p = _picker(_table(versions={1: [_ep(f"w{i}") for i in range(8)]}))
    held = [p.acquire("digits", 1) for _ in range(80)]
    counts = Counter(e.worker_id for e in held)
    assert len(counts) == 8
    assert max(counts.values()) - min(counts.values()) <= 3


def test_in_flight_survives_new_table() -> None:
    table = _table(versions={1: [_ep("a"), _ep("b")]})
    p = _picker(table)
    with p.use("digits", 1) as ep:
        assert p.in_flight(ep.worker_id) == 1
        table2 = router_pb2.RouteTable()
        table2.CopyFrom(table)
        table2.revision = 2
        p.set_table(table2)
        assert p.in_flight(ep.worker_id) == 1
    assert p.in_flight(ep.worker_id) == 0


def test_exclude_and_eject() -> None:
    table = _table(versions={1: [_ep("a"), _ep("b"), _ep("c")]})
    p = _picker(table)
    for _ in range(50):
        ep = p.acquire("digits", 1, exclude={"a", "b"})
        assert ep.worker_id == "c"
        p.release(ep)
    p.eject("c", 60.0)
    assert p.is_ejected("c")
    seen = set()
    for _ in range(50):
        ep = p.acquire("digits", 1)
        seen.add(ep.worker_id)
        p.release(ep)
    assert seen == {"a", "b"}
    # a and b are usable, only excluded: the ejected c is not picked instead.
    with pytest.raises(Unavailable):
        p.acquire("digits", 1, exclude={"a", "b"})
    # A table that still lists c as healthy does not end the ejection...
    t2 = _table(2, versions={1: [_ep("a"), _ep("b"), _ep("c")]})
    p.set_table(t2)
    assert p.is_ejected("c")
    # ...but c going unhealthy and coming back does.
    p.set_table(_table(3, versions={1: [_ep("a"), _ep("b"), _ep("c", healthy=False)]}))
    assert p.is_ejected("c")
    p.set_table(_table(4, versions={1: [_ep("a"), _ep("b"), _ep("c")]}))
    assert not p.is_ejected("c")
    # A short ejection ends with its timer.
    p.eject("a", 0.0)
    assert not p.is_ejected("a")


def test_a_lone_ejected_replica_keeps_serving() -> None:
    # One transient failure of the only replica must not refuse every request for the ejection's length.
    p = _picker(_table(versions={1: [_ep("a")]}))
    p.eject("a", 60.0)
    ep = p.acquire("digits", 1)
    assert ep.worker_id == "a" and p.in_flight("a") == 1
    p.release(ep)
    # The retry of a request that failed on it goes nowhere else, so it fails.
    with pytest.raises(Unavailable):
        p.acquire("digits", 1, exclude={"a"})
    # While another replica is usable, an ejected one is not picked even when the usable one is
    # excluded (the gateway's stream affinity excludes the others, then falls back to any replica).
    p = _picker(_table(versions={1: [_ep("a"), _ep("b")]}))
    p.eject("a", 60.0)
    with pytest.raises(Unavailable):
        p.acquire("digits", 1, exclude={"b"})
    # With two replicas both ejected, the less loaded one is tried.
    p = _picker(_table(versions={1: [_ep("a"), _ep("b")]}))
    p.eject("a", 60.0)
    p.eject("b", 60.0)
    busy = p.acquire("digits", 1)
    assert p.acquire("digits", 1).worker_id != busy.worker_id
    # ...and a retry goes to the one it has not tried.
    assert p.acquire("digits", 1, exclude={"a"}).worker_id == "b"


def test_unhealthy_endpoints_are_never_picked() -> None:
    p = _picker(_table(versions={1: [_ep("a", healthy=False), _ep("b")]}))
    assert {p.acquire("digits", 1).worker_id for _ in range(20)} == {"b"}
    p = _picker(_table(versions={1: [_ep("a", healthy=False)]}))
    with pytest.raises(Unavailable):
        p.acquire("digits", 1)
    assert not p.version_info("digits", 1).ready


def test_older_revision_ignored_unless_forced() -> None:
    p = _picker(_table(5, versions={1: [_ep("a")]}))
    assert not p.set_table(_table(4, versions={2: [_ep("a")]}))
    assert p.resolve("digits", "") == 1
    assert p.set_table(_table(1, versions={2: [_ep("a")]}), force=True)
    assert p.resolve("digits", "") == 2
    assert p.revision == 1


def test_model_route_and_version_info() -> None:
    p = _picker(_table(versions={1: [_ep("a")]}, aliases={"stable": 1}))
    assert p.models() == ["digits"]
    assert dict(p.model_route("digits").aliases) == {"stable": 1}
    info = p.version_info("digits", 1)
    assert info.ready and info.endpoints[0].worker_id == "a"
    with pytest.raises(VersionNotFound):
        p.version_info("digits", 2)
    with pytest.raises(ModelNotFound):
        p.model_route("x")
