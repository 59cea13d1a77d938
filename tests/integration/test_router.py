"""Router service: route table from registry + heartbeats, streaming to subscribers, restarts, admin API."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from mesh.errors import Unavailable
from mesh.redis_embed import EmbeddedRedis
from mesh.registry import Registry
from mesh_pb import common_pb2, registry_pb2, registry_pb2_grpc, router_pb2, router_pb2_grpc, worker_pb2
from router.app import RouterApp, start_router
from router.client import RouteWatcher
from router.picker import Picker
from router.settings import RouterSettings

SHA = "ab" * 32
READY = common_pb2.READY


def _settings(redis_url: str, prefix: str, **kw: object) -> RouterSettings:
    base: dict[str, object] = dict(
        redis_url=redis_url,
        key_prefix=prefix,
        bind="127.0.0.1:0",
        poll_interval_s=0.1,
        publish_interval_s=0.5,
        placement=False,
        log_json=False,
    )
    base.update(kw)
    return RouterSettings(**base)  # type: ignore[arg-type]


def _signature() -> common_pb2.Signature:
    return common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="pixels", datatype="FP32", shape=[-1, 64])],
        outputs=[common_pb2.TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])],
        max_batch_size=32,
    )


async def _register(registry: Registry, model: str = "digits", state: int = READY) -> int:
    mv = await registry.register_version(
        registry_pb2.RegisterVersionRequest(
            model=model,
            artifact_uri=f"store://{model}/x/model.pt2",
            sha256=SHA,
            format="torch_export",
            signature=_signature(),
            state=state,  # type: ignore[arg-type]
        )
    )
    return mv.ref.version


async def _beat(
    registry: Registry,
    worker_id: str,
    loaded: list[tuple[str, int]],
    *,
    ttl_s: float = 30.0,
    draining: bool = False,
    queue: int = 0,
) -> None:
    stats = worker_pb2.WorkerStats(
        worker_id=worker_id,
        address=f"127.0.0.1:{9 + len(worker_id)}",
        device="cpu",
        draining=draining,
        loaded=[
            worker_pb2.LoadedVersion(ref=common_pb2.ModelRef(name=m, version=v), queue_depth=queue)
            for m, v in loaded
        ],
    )
    await registry.heartbeat(stats, ttl_s)


def _endpoints(table: router_pb2.RouteTable, model: str, version: int) -> dict[str, bool]:
    for mr in table.models:
        if mr.model == model:
            for vr in mr.versions:
                if vr.version == version:
                    return {e.worker_id: e.healthy for e in vr.endpoints}
    return {}


def _aliases(table: router_pb2.RouteTable, model: str) -> dict[str, int]:
    return next((dict(mr.aliases) for mr in table.models if mr.model == model), {})


@pytest.fixture
async def router(redis_url: str, prefix: str) -> AsyncIterator[RouterApp]:
    app = await start_router(_settings(redis_url, prefix))
    try:
        yield app
    finally:
        await app.stop(0)


@pytest.fixture
async def follower(router: RouterApp) -> AsyncIterator[tuple[RouteWatcher, Picker]]:
    picker = Picker()
    watcher = RouteWatcher(router.address, picker.set_table, subscriber="test", backoff_max_s=0.2)
    await watcher.start()
    try:
        yield watcher, picker
    finally:
        await watcher.stop()


async def test_registered_version_and_heartbeat_reach_subscriber(
    registry: Registry, follower: tuple[RouteWatcher, Picker]
) -> None:
    watcher, picker = follower
    v = await _register(registry)
    await _beat(registry, "w1", [("digits", v)], queue=3)
    table = await watcher.wait_for(lambda t: _endpoints(t, "digits", v) == {"w1": True}, timeout=5)
    route = next(mr for mr in table.models if mr.model == "digits")
    vr = route.versions[0]
    assert vr.state == READY
    assert vr.signature == _signature()
    assert vr.endpoints[0].queue_depth == 3 and vr.endpoints[0].address == "127.0.0.1:11"
    # The picker fed by the watcher routes with it.
    assert picker.resolve("digits", "") == v
    with picker.use("digits", v) as ep:
        assert ep.worker_id == "w1" and ep.address == "127.0.0.1:11"


async def test_alias_and_traffic_changes_arrive_within_a_second(
    registry: Registry, follower: tuple[RouteWatcher, Picker]
) -> None:
    watcher, picker = follower
    v1 = await _register(registry)
    v2 = await _register(registry)
    await _beat(registry, "w1", [("digits", v1), ("digits", v2)])
    await registry.set_alias("digits", "stable", v1)
    await watcher.wait_for(lambda t: _aliases(t, "digits").get("stable") == v1, timeout=5)
    assert picker.resolve("digits", "") == v1

    start = time.monotonic()
    await registry.set_alias("digits", "stable", v2)
    await watcher.wait_for(lambda t: _aliases(t, "digits").get("stable") == v2, timeout=1.0)
    assert picker.resolve("digits", "") == v2
    alias_s = time.monotonic() - start

    await registry.set_traffic("digits", [(v1, 1.0), (v2, 3.0)])

    def has_split(t: router_pb2.RouteTable) -> bool:
        mr = next((m for m in t.models if m.model == "digits"), None)
        return mr is not None and [(w.version, w.weight) for w in mr.traffic] == [(v1, 1.0), (v2, 3.0)]

    await watcher.wait_for(has_split, timeout=1.0)
    picks = [picker.resolve("digits", "", f"r{i}") for i in range(400)]
    assert {v1, v2} == set(picks)
    assert alias_s < 1.0


async def test_expired_heartbeat_removes_endpoints_and_draining_is_unhealthy(
    registry: Registry, follower: tuple[RouteWatcher, Picker]
) -> None:
    watcher, picker = follower
    v = await _register(registry)
    await _beat(registry, "short", [("digits", v)], ttl_s=0.6)
    await _beat(registry, "drainer", [("digits", v)])
    await watcher.wait_for(
        lambda t: _endpoints(t, "digits", v) == {"short": True, "drainer": True}, timeout=5
    )
    await _beat(registry, "drainer", [("digits", v)], draining=True)
    # "short" stops beating: its key expires and its endpoint leaves the table; "drainer" stays, unhealthy.
    await watcher.wait_for(lambda t: _endpoints(t, "digits", v) == {"drainer": False}, timeout=5)
    assert not picker.version_info("digits", v).ready
    with pytest.raises(Unavailable):
        picker.acquire("digits", v)


async def test_restart_rebuilds_same_table_and_picker_keeps_last(
    redis_url: str, prefix: str, registry: Registry
) -> None:
    v = await _register(registry)
    await _beat(registry, "w1", [("digits", v)])
    await registry.set_alias("digits", "stable", v)
    app = await start_router(_settings(redis_url, prefix))
    picker = Picker()
    watcher = RouteWatcher(app.address, picker.set_table, backoff_max_s=0.2)
    await watcher.start()
    try:
        first = await watcher.wait_for(lambda t: bool(_endpoints(t, "digits", v)), timeout=5)
        await app.stop(0)
        # Router down: the picker still routes from its last table.
        await asyncio.sleep(0.3)
        assert picker.revision == first.revision
        assert picker.acquire("digits", picker.resolve("digits", "")).worker_id == "w1"

        app = await start_router(_settings(redis_url, prefix))
        fresh = RouteWatcher(app.address, lambda t: None)
        await fresh.start()
        try:
            second = await fresh.wait_for_table(timeout=5)
        finally:
            await fresh.stop()
        assert list(second.models) == list(first.models)
        assert second.revision > first.revision
    finally:
        await watcher.stop()
        await app.stop(0)


async def test_restart_promotes_versions_workers_already_hold(
    redis_url: str, prefix: str, registry: Registry
) -> None:
    # A REGISTERED version a worker already holds (e.g. the router restarted mid-placement) becomes
    # READY and stable without any load call (the fake worker's address does not even answer).
    v = await _register(registry, state=common_pb2.REGISTERED)
    await _beat(registry, "w1", [("digits", v)])
    app = await start_router(_settings(redis_url, prefix, placement=True, placement_interval_s=0.1))
    try:
        for _ in range(100):
            mv = await registry.get_version("digits", v)
            if mv.state == READY:
                break
            await asyncio.sleep(0.05)
        assert mv.state == READY
        model = await registry.get_model("digits", include_versions=False)
        assert dict(model.aliases) == {"stable": v}
    finally:
        await app.stop(0)


async def test_registry_admin_api_over_grpc(router: RouterApp, registry: Registry) -> None:
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        mv = await stub.RegisterVersion(
            registry_pb2.RegisterVersionRequest(
                model="digits",
                artifact_uri="store://digits/1/model.pt2",
                sha256=SHA,
                format="torch_export",
                signature=_signature(),
                state=READY,
            )
        )
        assert mv.ref.version == 1 and mv.state == READY
        got = await stub.GetVersion(common_pb2.ModelRef(name="digits", version=1))
        assert got == await registry.get_version("digits", 1)
        model = await stub.SetAlias(registry_pb2.SetAliasRequest(model="digits", alias="stable", version=1))
        assert dict(model.aliases) == {"stable": 1}
        model = await stub.SetTraffic(
            registry_pb2.SetTrafficRequest(
                model="digits", traffic=[common_pb2.TrafficWeight(version=1, weight=1)]
            )
        )
        assert [(t.version, t.weight) for t in model.traffic] == [(1, 1.0)]
        listed = await stub.ListModels(registry_pb2.ListModelsRequest(include_versions=True))
        assert [m.name for m in listed.models] == ["digits"] and len(listed.models[0].versions) == 1
        key = await stub.CreateApiKey(registry_pb2.CreateApiKeyRequest(name="ops", role=registry_pb2.ADMIN))
        assert (await registry.verify_api_key(key.token)) is not None
        assert (await stub.RevokeApiKey(registry_pb2.RevokeApiKeyRequest(key_id=key.key_id))).revoked
        assert (await registry.verify_api_key(key.token)) is None
        # The stable version, which also carries the whole split, is not retired by a slip; once the
        # alias and the split are cleared it is.
        retire = registry_pb2.SetVersionStateRequest(
            ref=common_pb2.ModelRef(name="digits", version=1), state=common_pb2.RETIRED, reason="done"
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SetVersionState(retire)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'stable'" in (err.value.details() or "")
        await stub.SetAlias(registry_pb2.SetAliasRequest(model="digits", alias="stable", version=0))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SetVersionState(retire)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "traffic split" in (err.value.details() or "")
        await stub.SetTraffic(registry_pb2.SetTrafficRequest(model="digits"))
        retired = await stub.SetVersionState(retire)
        assert retired.state == common_pb2.RETIRED
        events = stub.WatchEvents(registry_pb2.WatchEventsRequest(after_id="0"))
        kinds = []
        async for ev in events:
            kinds.append(ev.kind)
            if ev.kind == "version_state":
                break
        events.cancel()
        assert kinds[0] == "version_registered" and "alias" in kinds and "traffic" in kinds
        # Typed errors keep their codes over the wire.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetVersion(common_pb2.ModelRef(name="nope", version=1))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SetAlias(registry_pb2.SetAliasRequest(model="digits", alias="stable", version=1))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_place_unknown_and_no_worker(router: RouterApp, registry: Registry) -> None:
    await _register(registry, state=common_pb2.REGISTERED)
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Place(router_pb2.PlaceRequest(ref=common_pb2.ModelRef(name="nope")))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Place(router_pb2.PlaceRequest(ref=common_pb2.ModelRef(name="digits", version=7)))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Place(router_pb2.PlaceRequest(ref=common_pb2.ModelRef(name="digits", version=1)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_router_started_before_its_registry_waits_for_heartbeats(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Router and registry restarted together, the router first: the registry comes back with its models
    # but without the workers' heartbeat keys. A table sent before the workers beat again would route
    # every READY version nowhere; the first table waits for the heartbeat and goes out on it.
    data = tmp_path_factory.mktemp("redis-late")
    server = EmbeddedRedis(data, persist=True)
    url = server.start()
    registry = await Registry.connect(url, "late")
    try:
        v = await _register(registry)
        server.stop()
        app = await start_router(_settings(url, "late", registry_recovery_grace_s=30.0))
        tables: list[router_pb2.RouteTable] = []
        watcher = RouteWatcher(app.address, tables.append, backoff_max_s=0.2)
        await watcher.start()
        try:
            await asyncio.sleep(0.5)  # the router is up, its registry is not
            await asyncio.to_thread(server.start)
            await asyncio.sleep(1.0)  # the router reads the registry again: a READY version, no worker
            assert tables == []
            await _beat(registry, "w1", [("digits", v)])
            start = time.monotonic()
            first = await watcher.wait_for_table(timeout=5)
            assert time.monotonic() - start < 2.0  # on the heartbeat, not at the end of the grace
            assert tables[0] is first and _endpoints(first, "digits", v) == {"w1": True}
        finally:
            await watcher.stop()
            await app.stop(0)
    finally:
        await registry.close()
        server.stop()


async def test_first_table_without_a_worker_goes_out_after_the_grace(
    redis_url: str, prefix: str, registry: Registry
) -> None:
    # A READY version that no worker holds (they all died) is a legitimate table once the router had
    # the time to see heartbeats: it goes out after registry_recovery_grace_s.
    v = await _register(registry)
    app = await start_router(_settings(redis_url, prefix, registry_recovery_grace_s=1.0))
    watcher = RouteWatcher(app.address, lambda t: None, backoff_max_s=0.2)
    await watcher.start()
    try:
        with pytest.raises(TimeoutError):
            await watcher.wait_for_table(timeout=0.6)
        table = await watcher.wait_for_table(timeout=5)
        assert [vr.version for mr in table.models for vr in mr.versions] == [v]
        assert _endpoints(table, "digits", v) == {}
    finally:
        await watcher.stop()
        await app.stop(0)


async def test_busy_extra_replica_stays_and_an_idle_one_leaves_the_table_before_its_unload(
    redis_url: str, prefix: str, registry: Registry
) -> None:
    # Two (synthetic) workers hold a version whose base is one replica. Both serve a fast model: no
    # queue and nothing in flight at any heartbeat, but a request every moment. Neither is idle. Once
    # one stops serving it is unloaded, and first taken out of the table for unload_grace_s.
    v = await _register(registry)
    cold: set[str] = set()

    async def beat_forever() -> None:
        while True:
            now_ms = int(time.time() * 1000)
            for wid in ("w1", "w2"):
                used = now_ms - 600_000 if wid in cold else now_ms
                stats = worker_pb2.WorkerStats(
                    worker_id=wid,
                    address=f"127.0.0.1:{9 + len(wid)}",
                    device="cpu",
                    loaded=[
                        worker_pb2.LoadedVersion(
                            ref=common_pb2.ModelRef(name="digits", version=v), last_used_ms=used
                        )
                    ],
                )
                await registry.heartbeat(stats, 30.0)
            await asyncio.sleep(0.05)

    beats = asyncio.create_task(beat_forever())
    app = await start_router(
        _settings(
            redis_url,
            prefix,
            placement=True,
            placement_interval_s=0.1,
            scale_down_after_s=0.4,
            unload_grace_s=30.0,
        )
    )
    tables: list[router_pb2.RouteTable] = []
    watcher = RouteWatcher(app.address, tables.append, backoff_max_s=0.2)
    await watcher.start()
    try:
        await watcher.wait_for(lambda t: _endpoints(t, "digits", v) == {"w1": True, "w2": True}, timeout=5)
        await asyncio.sleep(1.5)  # well past scale_down_after_s
        assert all(_endpoints(t, "digits", v) == {"w1": True, "w2": True} for t in tables)
        cold.add("w2")
        await watcher.wait_for(lambda t: _endpoints(t, "digits", v) == {"w1": True}, timeout=5)
        # Out of the table, not unloaded yet: the worker still reports it (the grace is 30 s).
        workers = {w.worker_id: w for w in await registry.list_workers()}
        assert [lv.ref.version for lv in workers["w2"].loaded] == [v]
    finally:
        beats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beats
        await watcher.stop()
        await app.stop(0)
