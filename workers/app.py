"""Builds a worker (server, manager, heartbeat, preload) in-process: `await start_worker(settings)`."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import torch

from mesh.errors import FailedPrecondition, MeshError
from mesh.server import ServiceHost, start_metrics_server
from mesh.store import ArtifactStore
from mesh.v2 import SERVICE_NAME, pb_grpc
from mesh_pb import common_pb2, worker_pb2_grpc
from workers.control import WorkerControlServicer
from workers.heartbeat import Heartbeat
from workers.runtimes import select_device
from workers.service import ModelManager, parse_preload
from workers.servicer import InferenceServicer, WorkerInferenceServicer
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

CONTROL_SERVICE_NAME = "maas.v1.WorkerControl"
INFERENCE_SERVICE_NAME = "maas.v1.WorkerInference"
VS = common_pb2.VersionState


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


@dataclass
class WorkerApp:
    """A running worker. `address` serves v2 inference and maas.v1.WorkerControl."""

    settings: WorkerSettings
    host: ServiceHost
    manager: ModelManager
    worker_id: str
    address: str
    registry: Any = None
    heartbeat: Heartbeat | None = None
    metrics_port: int = 0
    mux: WorkerInferenceServicer | None = None
    _stopped: bool = field(default=False, repr=False)

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Refuses new work with UNAVAILABLE, tells the registry, waits for in-flight requests."""
        await self.host.set_serving(False)
        self.manager.draining = True
        if self.heartbeat is not None:
            await self.heartbeat.beat()
        done = await self.manager.drain(self.settings.drain_timeout_s if timeout_s is None else timeout_s)
        if not done:
            log.warning("drain timed out with %d requests still in flight", self.manager.in_flight())
        return done

    async def stop(self, *, drain: bool = True, grace_s: float = 1.0) -> None:
        """Drains (unless drain=False), deregisters, stops the server and frees every version."""
        if self._stopped:
            return
        self._stopped = True
        if drain:
            await self.drain()
        if self.heartbeat is not None:
            await self.heartbeat.stop(deregister=True)
        if self.mux is not None:
            await self.mux.close_streams()
        await self.host.stop(grace_s)
        await self.manager.close()
        if self.registry is not None:
            try:
                await self.registry.close()
            except Exception as exc:  # closing a dead connection must not fail the shutdown
                log.debug("registry close: %s", exc)

    async def load_from_registry(self, name: str, version: str = "") -> common_pb2.ModelVersion:
        """Loads a registered version (preload, RepositoryModelLoad); a failed load marks it FAILED."""
        if self.registry is None:
            raise FailedPrecondition("registry: this worker runs without a registry")
        reg = self.registry
        try:
            vid = await reg.resolve(name, version)
        except MeshError:
            if version:
                raise
            live = [
                mv.ref.version
                for mv in await reg.list_versions(name)
                if mv.state in (VS.REGISTERED, VS.LOADING, VS.READY)
            ]
            if not live:
                raise
            vid = max(live)
        record = await reg.get_version(name, vid)
        try:
            await self.manager.load(record)
        except MeshError as exc:
            try:
                await reg.set_state(name, vid, VS.FAILED, exc.message)
            except MeshError as state_exc:
                log.warning("could not mark %s:%s FAILED: %s", name, vid, state_exc)
            raise
        for state in (VS.LOADING, VS.READY):
            current = await reg.get_version(name, vid)
            if current.state in (VS.REGISTERED, VS.LOADING) and current.state != state:
                try:
                    await reg.set_state(name, vid, state)
                except MeshError as exc:
                    log.warning("could not move %s:%s to %s: %s", name, vid, state, exc)
        return record

    async def load_model(self, name: str) -> None:
        await self.load_from_registry(name, "")


def _advertise(settings: WorkerSettings, host: ServiceHost) -> str:
    if settings.advertise_address:
        return settings.advertise_address
    bound_host, port = host.address.rsplit(":", 1)
    if bound_host in ("0.0.0.0", "[::]", "::", ""):
        bound_host = socket.gethostname()
    return f"{bound_host}:{port}"


async def start_worker(settings: WorkerSettings) -> WorkerApp:
    """Starts a worker: server up, registry connected, preloads done, first heartbeat written."""
    device = select_device(settings.device)
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    elif device.type == "cpu":
        # Forward passes and the gRPC event loop share the CPUs: oversubscribing them with torch's
        # default thread count doubled p50 latency on a 2-vCPU machine (2.1 ms against 1.07 ms).
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    worker_id = settings.worker_id or default_worker_id()
    manager = ModelManager(
        ArtifactStore(settings.store_dir),
        device,
        worker_id=worker_id,
        memory_budget_bytes=settings.memory_budget_bytes,
        compute_threads=settings.compute_threads,
        load_threads=settings.load_threads,
        warmup=settings.warmup,
        graph_rewrites=settings.graph_rewrites,
    )
    registry = None
    if settings.registry and settings.redis_url:
        from mesh.registry import Registry

        registry = await Registry.connect(settings.redis_url, settings.key_prefix)

    host = ServiceHost("worker", settings)
    holder: dict[str, WorkerApp] = {}

    async def load_model(name: str) -> None:
        await holder["app"].load_model(name)

    async def drain(timeout_s: float) -> bool:
        return await holder["app"].drain(timeout_s)

    inference = InferenceServicer(
        manager,
        load_model=load_model if registry is not None else None,
        stream_max_in_flight=settings.stream_max_in_flight,
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(inference, host.server)
    host.add_service(SERVICE_NAME)
    mux = WorkerInferenceServicer(inference, settings.mux_max_in_flight)
    worker_pb2_grpc.add_WorkerInferenceServicer_to_server(mux, host.server)
    host.add_service(INFERENCE_SERVICE_NAME)
    control = WorkerControlServicer(manager, lambda: holder["app"].address, drain, settings.drain_timeout_s)
    worker_pb2_grpc.add_WorkerControlServicer_to_server(control, host.server)
    host.add_service(CONTROL_SERVICE_NAME)

    try:
        await host.start(settings.bind)
    except BaseException:
        await manager.close()
        if registry is not None:
            await registry.close()
        raise
    app = WorkerApp(
        settings=settings,
        host=host,
        manager=manager,
        worker_id=worker_id,
        address=_advertise(settings, host),
        registry=registry,
        mux=mux,
    )
    holder["app"] = app
    try:
        if settings.metrics_port:
            app.metrics_port = start_metrics_server(max(0, settings.metrics_port))
            log.info("worker metrics on http://127.0.0.1:%d/metrics", app.metrics_port)
        if registry is not None:
            app.heartbeat = Heartbeat(
                registry,
                lambda: manager.worker_stats(app.address),
                settings.heartbeat_interval_s,
                settings.heartbeat_ttl_s,
            )
            for name, version in parse_preload(settings.preload):
                try:
                    await app.load_from_registry(name, version)
                except MeshError as exc:
                    log.error("preload of %s:%s failed: %s", name, version or "latest", exc.message)
            await app.heartbeat.start()
        elif settings.preload:
            log.warning("preload %r ignored: no registry configured (MAAS_REDIS_URL)", settings.preload)
    except BaseException:
        await app.stop(drain=False)
        raise
    log.info("worker %s ready on %s (device %s)", worker_id, app.address, device)
    return app


async def serve(settings: WorkerSettings) -> None:
    """Runs until SIGTERM/SIGINT, then drains, deregisters and returns (python -m workers)."""
    from mesh.server import wait_for_signal

    app = await start_worker(settings)
    print(f"WORKER_READY {app.worker_id} {app.address}", flush=True)
    sig = await wait_for_signal()
    log.info("received %s: draining", sig.name)
    await app.stop(drain=True, grace_s=2.0)
    await asyncio.sleep(0)
