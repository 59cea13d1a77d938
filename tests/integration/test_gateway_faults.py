"""Gateway under faults with steady load: a worker killed with SIGKILL, the router restarted."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from prometheus_client import REGISTRY
from tritonclient.utils import InferenceServerException

from gateway.app import start_gateway
from mesh.codec import encode_request
from mesh.registry import Registry
from mesh.store import ArtifactStore
from mesh.v2 import pb, pb_grpc
from router.app import start_router
from tests.integration.gateway_stack import (
    WorkerProcess,
    gateway_settings,
    make_artifacts,
    ready_endpoints,
    register_digits,
    register_tinylm,
    router_settings,
    running_stack,
    wait_routable,
    wait_until,
)
from workers.models import load_module_state

pytestmark = pytest.mark.slow


class Load:
    """Closed-loop clients sending digits requests until stopped; counts outcomes."""

    def __init__(self, address: str, concurrency: int = 4) -> None:
        self.client = aioclient.InferenceServerClient(address)
        self.concurrency = concurrency
        self.ok = 0
        self.failures: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _loop(self, n: int) -> None:
        x = np.full((1, 64), float(n), np.float32)
        inp = aioclient.InferInput("pixels", [1, 64], "FP32")
        inp.set_data_from_numpy(x)
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                await self.client.infer("digits", [inp], request_id=f"{n}-{i}", client_timeout=10)
                self.ok += 1
            except InferenceServerException as exc:
                self.failures[f"{exc.status()}: {exc.message()}"] += 1
            await asyncio.sleep(0.002)

    def start(self) -> None:
        self._tasks = [asyncio.get_running_loop().create_task(self._loop(n)) for n in range(self.concurrency)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self.client.close()


async def test_worker_killed_under_load_loses_no_request(redis_url: str, prefix: str, tmp_path: Path) -> None:
    art = make_artifacts(tmp_path)
    store = ArtifactStore(tmp_path / "store")
    registry = await Registry.connect(redis_url, prefix)
    router = await start_router(router_settings(redis_url, prefix))
    procs = [WorkerProcess(redis_url, prefix, store, f"w{i}") for i in range(2)]
    gateway = None
    load = None
    try:
        await asyncio.gather(*(p.ready() for p in procs))
        v = await register_digits(registry, store, art)
        mv = await registry.get_version("digits", v)
        mv.min_replicas = 2
        await registry.update_version(mv)
        gateway = await start_gateway(gateway_settings(redis_url, prefix, router.address))
        await wait_routable(gateway, "digits", v, replicas=2, timeout=60)
        retries_before = REGISTRY.get_sample_value("maas_gateway_retries_total", {"model": "digits"}) or 0.0
        load = Load(gateway.address)
        load.start()
        await asyncio.sleep(1.0)
        before = load.ok
        counted = await _served(load.client)
        unseen = load.ok - before + load.concurrency  # answered by w0 after its last report, at most
        procs[0].kill()
        await asyncio.sleep(2.5)
        assert load.ok > before, "no request completed after the kill"
        await load.stop()
        assert load.failures == Counter(), load.failures
        # The gateway's statistics only grow, as a Triton server's do: the dead worker's counts stay in
        # the sum (perf_analyzer subtracts two readings, and failed when they dropped out).
        stats_client = aioclient.InferenceServerClient(gateway.address)
        try:
            served = await _served(stats_client)
        finally:
            await stats_client.close()
        assert served >= load.ok - unseen and counted > 0, (served, load.ok, unseen, counted)
        # Requests that met the dead worker were retried on the other replica.
        retries = REGISTRY.get_sample_value("maas_gateway_retries_total", {"model": "digits"}) or 0.0
        assert retries > retries_before
        assert gateway.picker.is_ejected("w0") or all(
            e.worker_id != "w0" or not e.healthy for e in gateway.picker.version_info("digits", v).endpoints
        )
    finally:
        if load is not None and not load._stop.is_set():
            await load.stop()
        if gateway is not None:
            await gateway.stop(0)
        for p in procs:
            p.stop()
        await router.stop(0)
        await registry.close()


async def _served(client: aioclient.InferenceServerClient) -> int:
    stats = await client.get_inference_statistics("digits")
    return sum(m.inference_stats.success.count for m in stats.model_stats)


async def test_router_restart_under_load_loses_no_request(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    art = make_artifacts(tmp_path)
    store = ArtifactStore(tmp_path / "store")
    async with running_stack(redis_url, prefix, store) as stack:
        v = await register_digits(stack.registry, store, art)
        await wait_routable(stack.gateway, "digits", v)
        load = Load(stack.gateway.address)
        load.start()
        try:
            await asyncio.sleep(0.5)
            address = stack.router.address
            await stack.router.stop(0)
            await asyncio.sleep(1.0)
            during = load.ok
            await asyncio.sleep(0.5)
            assert load.ok > during, "gateway stopped serving while the router was down"
            stack.router = await start_router(router_settings(redis_url, prefix), bind=address)
            start = time.monotonic()
            await wait_until(lambda: stack.gateway.watcher.connected, 10, "gateway reconnected to the router")
            assert time.monotonic() - start < 10
            await asyncio.sleep(1.0)
        finally:
            await load.stop()
        assert load.ok > 0
        assert load.failures == Counter(), load.failures


async def test_a_worker_that_no_longer_serves_a_version_is_skipped(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    # A worker unloads a version a moment before the gateway gets the table that says so (a retire, a
    # scale-down): its NOT_FOUND means "not here", and the request goes to another replica.
    art = make_artifacts(tmp_path)
    store = ArtifactStore(tmp_path / "store")
    async with running_stack(redis_url, prefix, store, in_process_workers=2, coalesce=False) as stack:
        v = await register_digits(stack.registry, store, art)
        mv = await stack.registry.get_version("digits", v)
        mv.min_replicas = 2
        await stack.registry.update_version(mv)
        await wait_until(
            lambda: ready_endpoints(stack.gateway.picker.table, "digits", v) == 2, 30, "two replicas"
        )
        await stack.router.stop(0)  # the gateway keeps its last table, which still lists both workers
        await stack.workers[0].manager.unload("digits", v)
        retries = REGISTRY.get_sample_value("maas_gateway_retries_total", {"model": "digits"}) or 0.0
        for upstream in ("stream", "unary"):
            stack.gateway.service._multiplex = upstream == "stream"
            load = Load(stack.gateway.address)
            load.start()
            await asyncio.sleep(1.0)
            await load.stop()
            assert load.ok > 0
            assert load.failures == Counter(), (upstream, load.failures)
        after = REGISTRY.get_sample_value("maas_gateway_retries_total", {"model": "digits"}) or 0.0
        assert after > retries  # requests did meet the worker without the version
        assert not stack.gateway.picker.is_ejected(stack.workers[0].worker_id)  # that worker is fine


async def test_a_stopping_gateway_ends_streams_once_their_requests_are_answered(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    # SIGTERM: generations under way finish; what a client sends afterwards is answered UNAVAILABLE; the
    # stream then ends with OK, and new streams are refused, instead of every stream being cut when the
    # grace runs out.
    art = make_artifacts(tmp_path)
    store = ArtifactStore(tmp_path / "store")
    async with running_stack(redis_url, prefix, store) as stack:
        v = await register_tinylm(stack.registry, store, art)
        await wait_routable(stack.gateway, "tinylm", v)
        async with grpc.aio.insecure_channel(stack.gateway.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            call = stub.ModelStreamInfer()
            await call.write(_tinylm("long", 120))
            first = await call.read()
            assert first.infer_response.id == "long" and not first.error_message
            drain = asyncio.create_task(stack.gateway.service.drain(30.0))
            await asyncio.sleep(0)
            await call.write(_tinylm("late", 5))
            texts: dict[str, int] = {"long": 1}
            errors: dict[str, str] = {}
            final = False
            while (response := await call.read()) != grpc.aio.EOF:  # ends though the client never half-closes
                rid = response.infer_response.id
                if response.error_message:
                    errors[rid] = response.error_message
                    continue
                texts[rid] = texts.get(rid, 0) + 1
                final = final or response.infer_response.parameters["triton_final_response"].bool_param
            await asyncio.wait_for(drain, 30)
            lm, _ = load_module_state(art.tinylm_path)
            expected = len(list(lm.generate("the mesh", 120)))  # type: ignore[operator]
            assert final and texts["long"] == expected, (texts, expected)  # not cut short
            assert set(errors) == {"late"} and "UNAVAILABLE" in errors["late"], errors
            assert await call.code() == grpc.StatusCode.OK
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.ModelStreamInfer(_once(_tinylm("new", 3))):
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def _tinylm(request_id: str, max_tokens: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tinylm", id=request_id)
    return encode_request(
        request,
        [
            ("prompt", np.array([b"the mesh"], dtype=object), "BYTES"),
            ("max_tokens", np.array([max_tokens], np.int32)),
        ],
    )


async def _once(request: pb.ModelInferRequest) -> AsyncIterator[pb.ModelInferRequest]:
    yield request


async def test_large_requests_take_a_call_of_their_own(
    redis_url: str, prefix: str, store: ArtifactStore, tmp_path: Path
) -> None:
    """Small requests share the multiplexed stream to the worker; one above stream_max_bytes makes its
    own v2 call (it would hold up the small ones queued behind it). Both answer correctly."""
    from tests.integration.gateway_stack import make_artifacts, register_digits, running_stack, wait_routable

    art = make_artifacts(tmp_path)
    async with running_stack(redis_url, prefix, store, stream_max_bytes=300, coalesce=False) as s:
        v = await register_digits(s.registry, store, art)
        await wait_routable(s.gateway, "digits", v)
        client = aioclient.InferenceServerClient(s.gateway.address)
        try:
            for rows in (1, 4):  # 256 bytes (stream), then 1,024 bytes (a call of its own)
                x = np.random.default_rng(rows).uniform(0, 16, (rows, 64)).astype(np.float32)
                inp = aioclient.InferInput("pixels", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                result = await client.infer("digits", [inp])
                np.testing.assert_allclose(
                    result.as_numpy("logits"), art.digits_reference(x), rtol=1e-5, atol=1e-5
                )
                service = s.gateway.service
                used = (set(service._links), set(service._stubs))
                address = s.workers[0].address
                assert used == (({address}, set()) if rows == 1 else ({address}, {address}))
        finally:
            await client.close()
