"""`python -m workers` as a subprocess: SIGTERM drains in-flight requests; kill -9 lets the heartbeat expire."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca

from mesh.registry import Registry
from mesh.server import open_channel
from mesh.store import ArtifactStore
from mesh_pb import worker_pb2, worker_pb2_grpc
from tests.integration.test_worker_support import export_mlp, mlp, mlp_record

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


class WorkerProcess:
    def __init__(self, proc: asyncio.subprocess.Process, worker_id: str, address: str) -> None:
        self.proc = proc
        self.worker_id = worker_id
        self.address = address


async def _wait_workers(registry: Registry, present: bool, worker_id: str, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        ids = {w.worker_id for w in await registry.list_workers()}
        if (worker_id in ids) == present:
            return True
        await asyncio.sleep(0.1)
    return False


@pytest.fixture
async def worker_process(
    redis_url: str, prefix: str, store: ArtifactStore, tmp_path: Path
) -> AsyncIterator[WorkerProcess]:
    env = dict(os.environ)
    env.update(
        MAAS_WORKER_BIND="127.0.0.1:0",
        MAAS_REDIS_URL=redis_url,
        MAAS_KEY_PREFIX=prefix,
        MAAS_STORE_DIR=str(store.root),
        MAAS_WORKER_DEVICE="cpu",
        MAAS_WORKER_HEARTBEAT_INTERVAL_S="0.2",
        MAAS_WORKER_HEARTBEAT_TTL_S="1.0",
        MAAS_WORKER_DRAIN_TIMEOUT_S="20",
        MAAS_LOG_JSON="false",
    )
    log = os.open(tmp_path / "worker.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "workers", cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=log
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        parts = line.decode().split()
        assert parts[:1] == ["WORKER_READY"], (line, (tmp_path / "worker.log").read_text()[-2000:])
        yield WorkerProcess(proc, parts[1], parts[2])
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(log)


async def test_sigterm_drains_in_flight_requests(
    worker_process: WorkerProcess, registry: Registry, store: ArtifactStore, tmp_path: Path
) -> None:
    assert await _wait_workers(registry, True, worker_process.worker_id, 5)
    src = export_mlp(tmp_path / "mlp.pt2")
    # 300 ms batching delay: requests sit in the queue when SIGTERM arrives.
    rec = mlp_record(store, src, delay_us=300_000, max_batch_size=4)
    async with open_channel(worker_process.address) as channel:
        await worker_pb2_grpc.WorkerControlStub(channel).LoadVersion(
            worker_pb2.LoadVersionRequest(version=rec)
        )
    client = tca.InferenceServerClient(worker_process.address)
    try:
        xs = [np.random.default_rng(i).uniform(0, 16, (1, 64)).astype(np.float32) for i in range(10)]
        inputs = []
        for x in xs:
            inp = tc.InferInput("pixels", [1, 64], "FP32")
            inp.set_data_from_numpy(x)
            inputs.append(inp)
        calls = [asyncio.create_task(client.infer("mlp", [inp])) for inp in inputs]
        # SIGTERM once every request has reached the worker (done, computing or queued): on a busy
        # machine a fixed sleep can signal before the last ones arrive, and those are refused.
        await _wait_all_arrived(client, worker_process.address, len(calls), timeout_s=15)
        worker_process.proc.send_signal(signal.SIGTERM)
        results = await asyncio.wait_for(asyncio.gather(*calls), 30)
    finally:
        await client.close()
    import torch

    with torch.no_grad():
        model = mlp()
        for x, r in zip(xs, results, strict=True):
            np.testing.assert_allclose(
                r.as_numpy("logits"), model(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5
            )
    assert await asyncio.wait_for(worker_process.proc.wait(), 30) == 0
    # deregistered at once (well before the 1 s TTL could expire it)
    ids = {w.worker_id for w in await registry.list_workers()}
    assert worker_process.worker_id not in ids


async def _wait_all_arrived(
    client: tca.InferenceServerClient, address: str, count: int, timeout_s: float
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with open_channel(address) as channel:
        control = worker_pb2_grpc.WorkerControlStub(channel)
        while True:
            stats = await control.GetStats(worker_pb2.GetStatsRequest())
            waiting = sum(v.queue_depth + v.in_flight for v in stats.loaded)
            served = await client.get_inference_statistics("mlp")
            done = sum(m.inference_stats.success.count for m in served.model_stats)
            if waiting + done >= count:
                return
            assert asyncio.get_running_loop().time() < deadline, f"only {waiting + done} of {count} arrived"
            await asyncio.sleep(0.01)


async def test_heartbeat_expires_after_kill(worker_process: WorkerProcess, registry: Registry) -> None:
    assert await _wait_workers(registry, True, worker_process.worker_id, 5)
    stats = {w.worker_id: w for w in await registry.list_workers()}[worker_process.worker_id]
    assert stats.address == worker_process.address and stats.device == "cpu"
    worker_process.proc.kill()
    await worker_process.proc.wait()
    assert await _wait_workers(registry, False, worker_process.worker_id, 5)
