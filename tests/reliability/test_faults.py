"""Faults under steady load: kill -9 / SIGTERM a worker, kill -9 the router, kill -9 Redis (appendonly).

One mesh of real subprocesses for the module: Redis with appendonly persistence, a router, two workers
holding `digits` (min_replicas=2) and a gateway that requires API keys. Three tritonclient aio clients
keep calling ModelInfer through the gateway while each fault happens; every answer is checked against
the reference logits. The tests run in file order and each leaves two replicas serving.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mesh.registry import Registry
from mesh.testing import unique_prefix
from mesh_pb import common_pb2, registry_pb2
from tests.reliability.harness import (
    DigitsArtifact,
    MeshStack,
    PersistentRedis,
    ServiceProcess,
    SteadyLoad,
    async_wait_until,
    fetch_table,
    healthy_workers,
    make_digits_artifact,
    register_request,
    short_tmpdir,
    write_figures,
)

pytestmark = pytest.mark.slow

CLIENTS = 3
ACKED_WRITES = 40  # half register_version, half set_alias
REDIS_APPENDFSYNC = "everysec"  # what EmbeddedRedis (and so `make up`) runs with


@dataclass
class FaultMesh:
    stack: MeshStack
    redis: PersistentRedis
    digits: DigitsArtifact
    pixels: np.ndarray
    expected: np.ndarray
    token: str

    def load(self, **kw: object) -> SteadyLoad:
        assert self.stack.gateway is not None
        return SteadyLoad(
            self.stack.gateway.address,
            "digits",
            self.pixels,
            self.expected,
            clients=CLIENTS,
            headers={"authorization": f"Bearer {self.token}"},
            max_requests=200_000,
            max_seconds=90.0,
            **kw,  # type: ignore[arg-type]
        )

    def live_workers(self) -> list[ServiceProcess]:
        return [w for w in self.stack.workers if w.alive]

    async def replicas(self) -> set[str]:
        assert self.stack.router is not None
        table = await fetch_table(self.stack.router.address)
        return healthy_workers(table, "digits", 1)

    async def wait_replicas(self, ids: set[str], timeout_s: float = 60.0) -> float:
        """Waits until exactly these workers are the healthy replicas of digits:1; returns when (monotonic)."""

        async def done() -> bool:
            return await self.replicas() == ids

        await async_wait_until(done, timeout_s, f"digits:1 replicas == {sorted(ids)}", interval_s=0.05)
        return time.monotonic()

    async def ensure_two_replicas(self) -> None:
        live = self.live_workers()
        while len(live) < 2:
            await asyncio.to_thread(self.stack.start_worker)
            live = self.live_workers()
        await self.wait_replicas({MeshStack.worker_id(w) for w in live[-2:]})


@pytest.fixture(scope="module")
def fault_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultMesh]:
    root = short_tmpdir("relf")  # short: the Redis unix socket lives here
    redis = PersistentRedis(root / "redis", appendfsync=REDIS_APPENDFSYNC)
    url = redis.start()
    prefix = unique_prefix()
    stack = MeshStack(root, url, prefix)
    digits = make_digits_artifact(stack.store, "digits", "v1")
    pixels = np.random.default_rng(2).uniform(0, 16, (4, 64)).astype(np.float32)

    async def setup() -> str:
        reg = await Registry.connect(url, prefix)
        try:
            await reg.register_version(register_request("digits", digits.artifact, min_replicas=2))
            _, token = await reg.create_api_key(
                "fault-load", registry_pb2.INFER, models=["digits", "digits-late", "digits-slow"]
            )
            return token
        finally:
            await reg.close()

    mesh = FaultMesh(stack, redis, digits, pixels, digits.reference(pixels), asyncio.run(setup()))
    try:
        stack.start_router()
        stack.start_worker()
        stack.start_worker()
        stack.start_gateway(auth_mode="required")
        asyncio.run(mesh.ensure_two_replicas())
        yield mesh
    finally:
        stack.stop_all()
        redis.stop()
        keep = tmp_path_factory.mktemp("fault-logs")
        shutil.copytree(stack.log_dir, keep, dirs_exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)


async def test_kill9_worker_under_load(fault_mesh: FaultMesh, figures_path: Path) -> None:
    mesh = fault_mesh
    await mesh.ensure_two_replicas()
    victim, survivor = mesh.live_workers()[-2:]
    load = await mesh.load().start()
    try:
        await load.wait_ok(50, 30)
        await asyncio.sleep(1.0)
        t_kill = time.monotonic()
        victim.kill()
        t_dropped = await mesh.wait_replicas({MeshStack.worker_id(survivor)}, timeout_s=30)
        await asyncio.sleep(1.0)
        await load.wait_ok(50, 30)
        t_start = time.monotonic()
        replacement = await asyncio.to_thread(mesh.stack.start_worker)
        t_restored = await mesh.wait_replicas(
            {MeshStack.worker_id(survivor), MeshStack.worker_id(replacement)}
        )
        await load.wait_ok(50, 30)
    finally:
        report = await load.stop()
    figures = {
        **report.summary(),
        "failure_examples": report.failure_details[:5],
        "longest_gap_without_success_s": round(report.max_gap(t_kill, t_kill + 5.0), 3),
        "ok_in_5s_after_kill": report.ok_between(t_kill, t_kill + 5.0),
        "dead_worker_left_route_table_s": round(t_dropped - t_kill, 3),
        "replacement_start_to_serving_s": round(t_restored - t_start, 3),
        "kill_to_two_replicas_s": round(t_restored - t_kill, 3),
    }
    write_figures(figures_path, "fault_kill9_worker", figures)
    assert report.failed == 0, report.failure_details
    assert report.wrong == 0


async def test_sigterm_worker_under_load(fault_mesh: FaultMesh, figures_path: Path) -> None:
    mesh = fault_mesh
    await mesh.ensure_two_replicas()
    victim, survivor = mesh.live_workers()[-2:]
    load = await mesh.load().start()
    try:
        await load.wait_ok(50, 30)
        await asyncio.sleep(1.0)
        t_term = time.monotonic()
        victim.terminate()
        exit_code = await asyncio.to_thread(victim.wait, 30.0)
        t_exit = time.monotonic()
        t_dropped = await mesh.wait_replicas({MeshStack.worker_id(survivor)}, timeout_s=30)
        await load.wait_ok(50, 30)
        replacement = await asyncio.to_thread(mesh.stack.start_worker)
        await mesh.wait_replicas({MeshStack.worker_id(survivor), MeshStack.worker_id(replacement)})
        await load.wait_ok(50, 30)
    finally:
        report = await load.stop()
    figures = {
        **report.summary(),
        "failure_examples": report.failure_details[:5],
        "exit_code": exit_code,
        "sigterm_to_exit_s": round(t_exit - t_term, 3),
        "sigterm_to_left_route_table_s": round(t_dropped - t_term, 3),
        "longest_gap_without_success_s": round(report.max_gap(t_term, t_exit + 2.0), 3),
    }
    write_figures(figures_path, "fault_sigterm_worker", figures)
    assert exit_code == 0
    assert report.failed == 0, report.failure_details
    assert report.wrong == 0


async def test_kill9_worker_with_streamed_requests_queued(fault_mesh: FaultMesh, figures_path: Path) -> None:
    """ModelStreamInfer through the gateway: requests queued on a worker that dies (nothing answered yet)
    are sent again to the other replica; the client sees only correct answers, the stream stays open."""
    import tritonclient.grpc as grpcclient

    mesh = fault_mesh
    await mesh.ensure_two_replicas()
    assert mesh.stack.gateway is not None and mesh.stack.router is not None
    reg = await Registry.connect(mesh.stack.redis_url, mesh.stack.prefix)
    try:
        # A 1.5 s batching delay holds every lone request in its worker's queue long enough to kill it.
        mv = await reg.register_version(
            register_request("digits-slow", mesh.digits.artifact, min_replicas=2, delay_us=1_500_000)
        )
    finally:
        await reg.close()
    version = int(mv.ref.version)
    live = {MeshStack.worker_id(w) for w in mesh.live_workers()[-2:]}
    router = mesh.stack.router.address

    async def placed() -> bool:
        return healthy_workers(await fetch_table(router), "digits-slow", version) == live

    await async_wait_until(placed, 60, "digits-slow on both workers", interval_s=0.1)

    answers: asyncio.Queue[tuple[Any, Any]] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    client = grpcclient.InferenceServerClient(mesh.stack.gateway.address)
    n = 6
    try:
        client.start_stream(
            callback=lambda result, error: loop.call_soon_threadsafe(answers.put_nowait, (result, error)),
            headers={"authorization": f"Bearer {mesh.token}"},
        )
        for i in range(n):
            inp = grpcclient.InferInput("pixels", list(mesh.pixels.shape), "FP32")
            inp.set_data_from_numpy(mesh.pixels)
            client.async_stream_infer("digits-slow", [inp], request_id=f"s{i}")
        await asyncio.sleep(0.5)  # all queued (1.5 s delay), spread over both workers by the picker
        # The victim is the worker holding the most of them, so some are certainly orphaned.
        queued = {w.pid: await _queued(w.address, "digits-slow") for w in mesh.live_workers()[-2:]}
        victim = max(mesh.live_workers()[-2:], key=lambda w: queued[w.pid])
        assert queued[victim.pid] > 0, queued
        t_kill = time.monotonic()
        victim.kill()
        got = [await asyncio.wait_for(answers.get(), 30) for _ in range(n)]
        t_done = time.monotonic()
    finally:
        await asyncio.to_thread(client.stop_stream)
        client.close()
    errors = [str(e) for _, e in got if e is not None]
    assert not errors, errors
    ids = sorted(r.get_response().id for r, _ in got)
    assert ids == sorted(f"s{i}" for i in range(n))
    for r, _ in got:
        np.testing.assert_allclose(r.as_numpy("logits"), mesh.expected, rtol=1e-5, atol=1e-5)
    write_figures(
        figures_path,
        "fault_kill9_worker_streamed",
        {
            "requests": n,
            "queued_on_the_killed_worker": queued[victim.pid],
            "errors": len(errors),
            "kill_to_last_answer_s": round(t_done - t_kill, 3),
        },
    )


async def _queued(address: str, model: str) -> int:
    """Requests of `model` waiting in a worker's queue (WorkerControl.GetStats)."""
    from mesh.server import open_channel
    from mesh_pb import worker_pb2, worker_pb2_grpc

    channel = open_channel(address)
    try:
        stats = await worker_pb2_grpc.WorkerControlStub(channel).GetStats(
            worker_pb2.GetStatsRequest(), timeout=5
        )
    finally:
        await channel.close()
    return sum(v.queue_depth for v in stats.loaded if v.ref.name == model)


async def _serves(mesh: FaultMesh, model: str) -> bool:
    import tritonclient.grpc.aio as grpcclient

    assert mesh.stack.gateway is not None
    client = grpcclient.InferenceServerClient(mesh.stack.gateway.address)
    try:
        inp = grpcclient.InferInput("pixels", list(mesh.pixels.shape), "FP32")
        inp.set_data_from_numpy(mesh.pixels)
        result = await client.infer(
            model, [inp], headers={"authorization": f"Bearer {mesh.token}"}, client_timeout=5.0
        )
        return bool(np.allclose(result.as_numpy("logits"), mesh.expected, rtol=1e-4, atol=1e-4))
    finally:
        await client.close()


async def test_kill9_router_under_load(fault_mesh: FaultMesh, figures_path: Path) -> None:
    mesh = fault_mesh
    await mesh.ensure_two_replicas()
    router = mesh.stack.router
    assert router is not None
    load = await mesh.load().start()
    try:
        await load.wait_ok(50, 30)
        await asyncio.sleep(1.0)
        t_kill = time.monotonic()
        router.kill()
        # While the router is down: traffic must keep flowing, and the registry changes (a new model that
        # only a fresh table can route).
        reg = await Registry.connect(mesh.redis.url, mesh.stack.prefix)
        try:
            await reg.register_version(register_request("digits-late", mesh.digits.artifact))
        finally:
            await reg.close()
        await asyncio.sleep(3.0)
        t_restart = time.monotonic()
        ok_while_down = load.report.ok_between(t_kill, t_restart)
        await asyncio.to_thread(mesh.stack.restart_router)
        t_up = time.monotonic()
        await async_wait_until(lambda: _serves(mesh, "digits-late"), 60.0, "gateway serves digits-late", 0.1)
        t_flow = time.monotonic()
        await load.wait_ok(50, 30)
    finally:
        report = await load.stop()
    figures = {
        **report.summary(),
        "failure_examples": report.failure_details[:5],
        "router_down_s": round(t_restart - t_kill, 3),
        "ok_while_router_down": ok_while_down,
        "longest_gap_without_success_s": round(report.max_gap(t_kill, t_up), 3),
        "router_restart_s": round(t_up - t_restart, 3),
        "restart_to_new_table_serving_s": round(t_flow - t_restart, 3),
    }
    write_figures(figures_path, "fault_kill9_router", figures)
    assert report.failed == 0, report.failure_details
    assert report.wrong == 0
    assert ok_while_down > 0


async def test_kill9_redis_under_load(fault_mesh: FaultMesh, figures_path: Path) -> None:
    mesh = fault_mesh
    await mesh.ensure_two_replicas()
    prefix = mesh.stack.prefix
    worker_ids = {MeshStack.worker_id(w) for w in mesh.live_workers()}
    load = await mesh.load().start()
    try:
        await load.wait_ok(50, 30)
        # Acknowledged registry writes, the last one right before the kill.
        reg = await Registry.connect(mesh.redis.url, prefix)
        acked_versions: list[int] = []
        acked_aliases: dict[str, int] = {}
        try:
            for i in range(ACKED_WRITES // 2):
                mv = await reg.register_version(
                    register_request(
                        "ackcheck", mesh.digits.artifact, state=common_pb2.REJECTED, labels={"i": str(i)}
                    )
                )
                acked_versions.append(mv.ref.version)
                await reg.set_alias("digits", f"ack{i}", 1)
                acked_aliases[f"ack{i}"] = 1
        finally:
            await reg.close()
        t_kill = time.monotonic()
        mesh.redis.kill()
        await asyncio.sleep(3.0)
        t_restart = time.monotonic()
        ok_while_down = load.report.ok_between(t_kill, t_restart)
        await asyncio.to_thread(mesh.redis.start)
        t_up = time.monotonic()
        restart_wall_ms = int(time.time() * 1000)
        reg = await Registry.connect(mesh.redis.url, prefix)
        try:

            async def heartbeats_back() -> bool:
                return {w.worker_id for w in await reg.list_workers()} >= worker_ids

            await async_wait_until(heartbeats_back, 30.0, "both workers heartbeating again")
            t_heartbeats = time.monotonic()
            assert mesh.stack.router is not None
            router_address = mesh.stack.router.address

            async def fresh_table() -> bool:
                table = await fetch_table(router_address)
                return table.built_ms > restart_wall_ms and len(healthy_workers(table, "digits", 1)) == 2

            await async_wait_until(fresh_table, 30.0, "router table rebuilt from the restarted registry")
            t_table = time.monotonic()
            found_versions = {mv.ref.version for mv in await reg.list_versions("ackcheck")}
            aliases = await reg.get_aliases("digits")
        finally:
            await reg.close()
        await load.wait_ok(50, 30)
    finally:
        report = await load.stop()
    lost_versions = sorted(set(acked_versions) - found_versions)
    lost_aliases = sorted(a for a, v in acked_aliases.items() if aliases.get(a) != v)
    figures = {
        **report.summary(),
        "failure_examples": report.failure_details[:5],
        "appendfsync": REDIS_APPENDFSYNC,
        "redis_down_s": round(t_restart - t_kill, 3),
        "ok_while_redis_down": ok_while_down,
        "failed_while_redis_down": report.failed_between(t_kill, t_up),
        "failed_after_restart": report.failed_between(t_up, report.stopped),
        "longest_gap_without_success_s": round(report.max_gap(t_kill, t_up + 2.0), 3),
        "redis_restart_s": round(t_up - t_restart, 3),
        "restart_to_heartbeats_back_s": round(t_heartbeats - t_up, 3),
        "restart_to_fresh_route_table_s": round(t_table - t_up, 3),
        "acked_writes": len(acked_versions) + len(acked_aliases),
        "acked_writes_lost": len(lost_versions) + len(lost_aliases),
        "lost": {"versions": lost_versions, "aliases": lost_aliases},
    }
    write_figures(figures_path, "fault_kill9_redis", figures)
    assert not lost_versions and not lost_aliases
    assert ok_while_down > 0
    assert report.failed == 0, report.failure_details
    assert report.wrong == 0
