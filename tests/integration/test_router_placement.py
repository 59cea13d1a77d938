"""Router placement with a real in-process worker: REGISTERED -> loaded -> READY + stable, failures, Place."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest
import torch

from mesh.registry import Registry
from mesh.store import ArtifactStore
from mesh_pb import common_pb2, registry_pb2, router_pb2, router_pb2_grpc
from router.app import RouterApp, start_router
from router.client import RouteWatcher
from router.picker import Picker
from router.settings import RouterSettings
from tests.integration.gateway_stack import router_settings

workers_app = pytest.importorskip("workers.app")
workers_settings = pytest.importorskip("workers.settings")
models = pytest.importorskip("workers.models")

VS = common_pb2.VersionState


def _signature() -> common_pb2.Signature:
    return common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="pixels", datatype="FP32", shape=[-1, 64])],
        outputs=[common_pb2.TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])],
        max_batch_size=16,
    )


@pytest.fixture
def digits_artifact(store: ArtifactStore, tmp_path: Path) -> tuple[torch.nn.Module, str, str]:
    torch.manual_seed(0)
    module = models.build("digits_mlp", {"hidden": [32]}).eval()
    path = models.save_module_state(module, tmp_path / "model.pt")
    art = store.put_file("digits", "a1", path, "model.pt")
    return module, art.uri, art.sha256


async def _register(registry: Registry, uri: str, sha256: str) -> int:
    mv = await registry.register_version(
        registry_pb2.RegisterVersionRequest(
            model="digits", artifact_uri=uri, sha256=sha256, format="module_state", signature=_signature()
        )
    )
    assert mv.state == VS.REGISTERED
    return mv.ref.version


@pytest.fixture
async def worker(redis_url: str, prefix: str, store: ArtifactStore) -> AsyncIterator[object]:
    settings = workers_settings.WorkerSettings(
        bind="127.0.0.1:0",
        redis_url=redis_url,
        key_prefix=prefix,
        store_dir=store.root,
        heartbeat_interval_s=0.2,
        heartbeat_ttl_s=2.0,
        device="cpu",
        warmup=False,
        log_json=False,
    )
    app = await workers_app.start_worker(settings)
    try:
        yield app
    finally:
        await app.stop(drain=False)


@pytest.fixture
async def router(redis_url: str, prefix: str) -> AsyncIterator[RouterApp]:
    settings = RouterSettings(
        redis_url=redis_url,
        key_prefix=prefix,
        bind="127.0.0.1:0",
        poll_interval_s=0.1,
        publish_interval_s=0.5,
        placement_interval_s=0.2,
        unload_grace_s=0.3,
        log_json=False,
    )
    app = await start_router(settings)
    try:
        yield app
    finally:
        await app.stop(0)


async def _wait_state(
    registry: Registry, version: int, state: int, timeout: float = 30.0
) -> common_pb2.ModelVersion:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        mv = await registry.get_version("digits", version)
        if mv.state == state or asyncio.get_running_loop().time() > deadline:
            return mv
        await asyncio.sleep(0.05)


async def test_registered_version_is_loaded_and_becomes_ready(
    registry: Registry,
    worker: object,
    router: RouterApp,
    digits_artifact: tuple[torch.nn.Module, str, str],
) -> None:
    module, uri, sha = digits_artifact
    picker = Picker()
    watcher = RouteWatcher(router.address, picker.set_table, backoff_max_s=0.2)
    await watcher.start()
    try:
        v = await _register(registry, uri, sha)
        mv = await _wait_state(registry, v, VS.READY)
        assert mv.state == VS.READY, mv.reason
        assert dict((await registry.get_model("digits", include_versions=False)).aliases) == {"stable": v}
        # The table shows the worker as the version's endpoint; the picker routes unversioned requests to it.
        await watcher.wait_for(
            lambda t: any(
                vr.version == v and vr.state == VS.READY and vr.endpoints
                for mr in t.models
                for vr in mr.versions
            ),
            timeout=10,
        )
        assert picker.resolve("digits", "") == v
        ep = picker.acquire("digits", v)
        picker.release(ep)
        assert ep.worker_id == worker.worker_id and ep.address == worker.address  # type: ignore[attr-defined]

        # The worker really serves it: compare with the torch reference.
        import tritonclient.grpc.aio as tc

        x = np.random.default_rng(0).integers(0, 17, size=(3, 64)).astype(np.float32)
        client = tc.InferenceServerClient(ep.address)
        try:
            inp = tc.InferInput("pixels", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            result = await client.infer("digits", [inp], model_version=str(v))
        finally:
            await client.close()
        with torch.no_grad():
            expected = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-4, atol=1e-4)

        # Place(unload) takes it off the worker and keeps placement from putting it back; Place(load)
        # puts it back.
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            ref = common_pb2.ModelRef(name="digits", version=v)
            out = await stub.Place(router_pb2.PlaceRequest(ref=ref, unload=True))
            assert list(out.worker_ids) == []
            await asyncio.sleep(0.5)
            assert not any(lv.ref.version == v for lv in (await registry.list_workers())[0].loaded)
            out = await stub.Place(router_pb2.PlaceRequest(ref=ref))
            assert list(out.worker_ids) == [worker.worker_id]  # type: ignore[attr-defined]
    finally:
        await watcher.stop()


async def test_bad_artifact_marks_version_failed(
    registry: Registry,
    worker: object,
    router: RouterApp,
    digits_artifact: tuple[torch.nn.Module, str, str],
) -> None:
    _module, uri, _sha = digits_artifact
    v = await _register(registry, uri, "0" * 64)
    mv = await _wait_state(registry, v, VS.FAILED)
    assert mv.state == VS.FAILED
    assert "sha256" in mv.reason


async def test_place_loads_now(
    registry: Registry,
    worker: object,
    redis_url: str,
    prefix: str,
    digits_artifact: tuple[torch.nn.Module, str, str],
) -> None:
    # Placement loop off: only the Place RPC (the gateway's RepositoryModelLoad) loads.
    settings = RouterSettings(
        redis_url=redis_url, key_prefix=prefix, bind="127.0.0.1:0", placement=False, log_json=False
    )
    app = await start_router(settings)
    try:
        _module, uri, sha = digits_artifact
        v = await _register(registry, uri, sha)
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            out = await stub.Place(router_pb2.PlaceRequest(ref=common_pb2.ModelRef(name="digits")))
        assert list(out.worker_ids) == [worker.worker_id]  # type: ignore[attr-defined]
        assert (await registry.get_version("digits", v)).state == VS.READY
        # The table published before Place returned already routes to it.
        vr = next(vr for mr in app.service.table.models for vr in mr.versions if vr.version == v)
        assert [e.worker_id for e in vr.endpoints] == [worker.worker_id]  # type: ignore[attr-defined]
    finally:
        await app.stop(0)


async def test_deep_queue_adds_a_replica(
    registry: Registry,
    worker: object,
    redis_url: str,
    prefix: str,
    digits_artifact: tuple[torch.nn.Module, str, str],
) -> None:
    # A READY version held by one (synthetic) worker whose reported queue stays deep gets a second
    # replica on the idle real worker.
    from mesh_pb import worker_pb2

    _module, uri, sha = digits_artifact
    mv = await registry.register_version(
        registry_pb2.RegisterVersionRequest(
            model="digits",
            artifact_uri=uri,
            sha256=sha,
            format="module_state",
            signature=_signature(),
            state=VS.READY,
            max_replicas=2,
        )
    )
    busy = worker_pb2.WorkerStats(
        worker_id="busy",
        address="127.0.0.1:9",
        device="cpu",
        loaded=[worker_pb2.LoadedVersion(ref=mv.ref, queue_depth=40)],
    )
    await registry.heartbeat(busy, 30.0)
    settings = RouterSettings(
        redis_url=redis_url,
        key_prefix=prefix,
        bind="127.0.0.1:0",
        poll_interval_s=0.1,
        placement_interval_s=0.1,
        scale_queue_depth=8,
        scale_after_s=0.3,
        log_json=False,
    )
    app = await start_router(settings)
    try:
        for _ in range(600):  # up to 30 s: the machine running the suite may be busy
            if app.service.holders("digits", mv.ref.version) == sorted(["busy", worker.worker_id]):  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.05)
        assert app.service.holders("digits", mv.ref.version) == sorted(["busy", worker.worker_id])  # type: ignore[attr-defined]
        await asyncio.sleep(0.5)
        # max_replicas=2: no third load attempt anywhere.
        assert len(app.service.holders("digits", mv.ref.version)) == 2
    finally:
        await app.stop(0)


async def test_retired_version_is_served_until_the_unload_grace_ends(
    registry: Registry,
    worker: object,
    redis_url: str,
    prefix: str,
    digits_artifact: tuple[torch.nn.Module, str, str],
) -> None:
    # A gateway gets each table a moment after the router publishes it; one still on the table before
    # the retirement sends the retired version's requests to the worker. The worker keeps serving it
    # for unload_grace_s after the first table without it, and only then unloads it.
    import tritonclient.grpc.aio as tc
    from tritonclient.utils import InferenceServerException

    grace_s = 1.5
    app = await start_router(
        router_settings(redis_url, prefix, placement_interval_s=0.1, unload_grace_s=grace_s)
    )
    watcher = RouteWatcher(app.address, lambda t: None, backoff_max_s=0.2)
    await watcher.start()
    client = tc.InferenceServerClient(worker.address)  # type: ignore[attr-defined]
    try:
        _module, uri, sha = digits_artifact
        v1 = await _register(registry, uri, sha)
        assert (await _wait_state(registry, v1, VS.READY)).state == VS.READY
        v2 = await _register(registry, uri, sha)
        assert (await _wait_state(registry, v2, VS.READY)).state == VS.READY

        def routed(t: router_pb2.RouteTable) -> set[int]:
            return {vr.version for mr in t.models for vr in mr.versions if vr.endpoints}

        await watcher.wait_for(lambda t: routed(t) == {v1, v2}, timeout=10)
        await registry.set_state("digits", v2, VS.RETIRED)  # v1 is stable: v2 needs no force
        left = await watcher.wait_for(lambda t: routed(t) == {v1}, timeout=5)

        inp = tc.InferInput("pixels", [1, 64], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
        served = 0
        failure = ""
        failed_ms = 0.0
        deadline = time.time() + grace_s + 10
        while time.time() < deadline:
            try:
                await client.infer("digits", [inp], model_version=str(v2))
                served += 1
            except InferenceServerException as exc:
                failed_ms = time.time() * 1000
                failure = str(exc)
                break
        assert failure, "the retired version was never unloaded"
        assert "not found" in failure.lower()
        assert served > 0
        # No request failed before the grace ended (built_ms: when the table without v2 was published).
        assert failed_ms >= left.built_ms + grace_s * 1000 - 5
        result = await client.infer("digits", [inp], model_version=str(v1))
        assert result.as_numpy("logits").shape == (1, 10)
    finally:
        await client.close()
        await watcher.stop()
        await app.stop(0)
