"""Shared helpers (no tests) for the gateway tests: small real models, a router, workers and a gateway."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gateway.app import GatewayApp, start_gateway
from gateway.settings import GatewaySettings
from mesh.registry import Registry
from mesh.store import ArtifactStore
from mesh_pb import common_pb2, registry_pb2, router_pb2
from router.app import RouterApp, start_router
from router.settings import RouterSettings
from workers.app import WorkerApp, start_worker
from workers.models import build, export_module, save_module_state
from workers.settings import WorkerSettings

READY = common_pb2.READY
ROOT = Path(__file__).resolve().parents[2]


def digits_signature(max_batch: int = 64) -> common_pb2.Signature:
    return common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="pixels", datatype="FP32", shape=[-1, 64])],
        outputs=[common_pb2.TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])],
        max_batch_size=max_batch,
    )


def tinylm_signature() -> common_pb2.Signature:
    return common_pb2.Signature(
        inputs=[
            common_pb2.TensorSpec(name="prompt", datatype="BYTES", shape=[1]),
            common_pb2.TensorSpec(name="max_tokens", datatype="INT32", shape=[1], optional=True),
        ],
        outputs=[common_pb2.TensorSpec(name="text", datatype="BYTES", shape=[1])],
        max_batch_size=0,
        decoupled=True,
    )


@dataclass
class Artifacts:
    """Small random-weight demo models, exported once per test module, with a torch reference."""

    digits_module: torch.nn.Module
    digits_path: Path
    tinylm_path: Path

    def digits_reference(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out: np.ndarray = self.digits_module(torch.from_numpy(x)).numpy()
        return out


def make_artifacts(tmp: Path) -> Artifacts:
    torch.manual_seed(0)
    digits = build("digits_mlp", {"hidden": [32], "dropout": 0.0}).eval()
    digits_path = export_module(digits, (torch.zeros(1, 64),), tmp / "digits.pt2", max_batch=64)
    lm = build("tinylm", {"d_model": 32, "n_heads": 2, "n_layers": 1, "context": 32, "ff_mult": 2}).eval()
    tinylm_path = save_module_state(lm, tmp / "tinylm.pt")
    return Artifacts(digits, digits_path, tinylm_path)


async def register_digits(
    registry: Registry, store: ArtifactStore, art: Artifacts, model: str = "digits", state: int = READY
) -> int:
    stored = store.put_file(model, f"{os.urandom(4).hex()}", art.digits_path, "model.pt2")
    mv = await registry.register_version(
        registry_pb2.RegisterVersionRequest(
            model=model,
            artifact_uri=stored.uri,
            sha256=stored.sha256,
            format="torch_export",
            signature=digits_signature(),
            batching=common_pb2.BatchingConfig(enabled=True, max_queue_delay_us=100),
            dtype="fp32",
            state=state,  # type: ignore[arg-type]
            min_replicas=1,
        )
    )
    return int(mv.ref.version)


async def register_tinylm(
    registry: Registry, store: ArtifactStore, art: Artifacts, model: str = "tinylm"
) -> int:
    stored = store.put_file(model, "1", art.tinylm_path, "model.pt")
    mv = await registry.register_version(
        registry_pb2.RegisterVersionRequest(
            model=model,
            artifact_uri=stored.uri,
            sha256=stored.sha256,
            format="module_state",
            signature=tinylm_signature(),
            dtype="fp32",
            state=READY,  # type: ignore[arg-type]
            min_replicas=1,
        )
    )
    return int(mv.ref.version)


def router_settings(redis_url: str, prefix: str, **kw: Any) -> RouterSettings:
    base: dict[str, Any] = dict(
        redis_url=redis_url,
        key_prefix=prefix,
        bind="127.0.0.1:0",
        poll_interval_s=0.1,
        publish_interval_s=0.5,
        debounce_s=0.02,
        placement_interval_s=0.3,
        unload_grace_s=0.3,
        log_json=False,
    )
    base.update(kw)
    return RouterSettings(**base)


def worker_settings(redis_url: str, prefix: str, store: ArtifactStore, **kw: Any) -> WorkerSettings:
    base: dict[str, Any] = dict(
        bind="127.0.0.1:0",
        redis_url=redis_url,
        key_prefix=prefix,
        store_dir=store.root,
        heartbeat_interval_s=0.2,
        heartbeat_ttl_s=2.0,
        device="cpu",
        compute_threads=2,
        warmup=False,
        log_json=False,
    )
    base.update(kw)
    return WorkerSettings(**base)


def gateway_settings(redis_url: str, prefix: str, router_address: str, **kw: Any) -> GatewaySettings:
    base: dict[str, Any] = dict(
        bind="127.0.0.1:0",
        metrics_port=-1,
        redis_url=redis_url,
        key_prefix=prefix,
        router_address=router_address,
        auth_mode="optional",
        log_json=False,
        uvloop=False,
    )
    base.update(kw)
    return GatewaySettings(**base)


async def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def ready_endpoints(table: router_pb2.RouteTable, model: str, version: int) -> int:
    for mr in table.models:
        if mr.model == model:
            for vr in mr.versions:
                if vr.version == version and vr.state == READY:
                    return sum(1 for e in vr.endpoints if e.healthy)
    return 0


async def wait_routable(
    gw: GatewayApp, model: str, version: int, replicas: int = 1, timeout: float = 30.0
) -> None:
    await wait_until(
        lambda: ready_endpoints(gw.picker.table, model, version) >= replicas,
        timeout,
        f"{model}:{version} on {replicas} worker(s) in the gateway's table",
    )


@dataclass
class Stack:
    registry: Registry
    store: ArtifactStore
    router: RouterApp
    gateway: GatewayApp
    workers: list[WorkerApp] = field(default_factory=list)
    procs: list[WorkerProcess] = field(default_factory=list)

    async def stop(self) -> None:
        await self.gateway.stop(0)
        for w in self.workers:
            await w.stop()
        for p in self.procs:
            p.stop()
        await self.router.stop(0)


@contextlib.asynccontextmanager
async def running_stack(
    redis_url: str, prefix: str, store: ArtifactStore, *, in_process_workers: int = 1, **gateway_kw: Any
) -> AsyncIterator[Stack]:
    registry = await Registry.connect(redis_url, prefix)
    router = await start_router(router_settings(redis_url, prefix))
    workers = [
        await start_worker(worker_settings(redis_url, prefix, store)) for _ in range(in_process_workers)
    ]
    gateway = await start_gateway(gateway_settings(redis_url, prefix, router.address, **gateway_kw))
    stack = Stack(registry, store, router, gateway, workers)
    try:
        yield stack
    finally:
        await stack.stop()
        await registry.close()


class WorkerProcess:
    """`python -m workers` in a subprocess (for kill -9)."""

    def __init__(self, redis_url: str, prefix: str, store: ArtifactStore, worker_id: str) -> None:
        env = dict(os.environ)
        env.update(
            MAAS_WORKER_BIND="127.0.0.1:0",
            MAAS_REDIS_URL=redis_url,
            MAAS_KEY_PREFIX=prefix,
            MAAS_STORE_DIR=str(store.root),
            MAAS_WORKER_WORKER_ID=worker_id,
            MAAS_WORKER_HEARTBEAT_INTERVAL_S="0.2",
            MAAS_WORKER_HEARTBEAT_TTL_S="1.5",
            MAAS_WORKER_DEVICE="cpu",
            MAAS_WORKER_WARMUP="false",
            MAAS_WORKER_COMPUTE_THREADS="2",
            MAAS_LOG_LEVEL="WARNING",
            MAAS_LOG_JSON="false",
        )
        self.worker_id = worker_id
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
        self.address = ""

    async def ready(self, timeout: float = 60.0) -> str:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        parts = line.split()
        if len(parts) != 3 or parts[0] != "WORKER_READY":
            raise RuntimeError(f"worker did not start: {line!r}")
        self.address = parts[2]
        return self.address

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
