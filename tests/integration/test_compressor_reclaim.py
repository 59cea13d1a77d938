"""A job whose compressor is killed mid-way is reclaimed from the Redis stream and completes once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from compressor.app import CompressorApp, start_compressor
from compressor.settings import CompressorSettings
from compressor.testing import register_digits
from mesh.store import ArtifactStore
from mesh_pb import common_pb2, compressor_pb2

JS = compressor_pb2.JobState
ROOT = Path(__file__).resolve().parents[2]
LEASE_S = 2.0


@pytest.fixture
async def front(redis_url: str, prefix: str, tmp_path: Path) -> AsyncIterator[CompressorApp]:
    """An in-process compressor that accepts jobs but does not take any until the test says so."""
    settings = CompressorSettings(
        redis_url=redis_url, key_prefix=prefix, store_dir=tmp_path / "models", var_dir=tmp_path / "var",
        lease_s=LEASE_S, poll_s=0.1, latency_iters=10, run_jobs=False, log_json=False,
    )  # fmt: skip
    app = await start_compressor(settings, bind="127.0.0.1:0", consumer="front")
    try:
        yield app
    finally:
        await app.stop(grace_s=1.0)


async def wait_for(front: CompressorApp, job_id: str, predicate, timeout_s: float) -> compressor_pb2.Job:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        job = await front.service.get(job_id)
        if predicate(job):
            return job
        if loop.time() > deadline:
            raise AssertionError(f"timed out; job is {JS.Name(job.state)} {job.stage!r}")
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_killed_compressor_job_is_reclaimed_and_completes_once(
    front: CompressorApp, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    await register_digits(front.registry, ArtifactStore(tmp_path / "models"))
    env = dict(
        os.environ,
        MAAS_REDIS_URL=redis_url, MAAS_KEY_PREFIX=prefix, MAAS_STORE_DIR=str(tmp_path / "models"),
        MAAS_VAR_DIR=str(tmp_path / "var-a"), MAAS_COMPRESSOR_BIND="127.0.0.1:0",
        MAAS_COMPRESSOR_LEASE_S=str(LEASE_S), MAAS_COMPRESSOR_POLL_S="0.1", MAAS_COMPRESSOR_TORCH_THREADS="1",
        MAAS_LOG_JSON="false", OMP_NUM_THREADS="1",
    )  # fmt: skip
    log = (tmp_path / "victim.log").open("wb")
    victim = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "compressor", cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        job = await front.service.submit(
            compressor_pb2.SubmitJobRequest(
                source=common_pb2.ModelRef(name="digits"),
                steps=[
                    compressor_pb2.Step(
                        method="distill", params={"epochs": 300}, options={"student": "digits_mlp:32"}
                    )
                ],
                max_accuracy_drop=0.05,
                job_id="survivor",
            )
        )
        running = await wait_for(
            front,
            job.job_id,
            lambda j: j.state == JS.JOB_RUNNING and j.stage.startswith("distill epoch"),
            120,
        )
        assert running.attempts == 1
        victim.send_signal(signal.SIGKILL)
        await asyncio.wait_for(victim.wait(), timeout=10)
    finally:
        if victim.returncode is None:
            victim.kill()
            await asyncio.wait_for(victim.wait(), timeout=10)
        log.close()
    # Still RUNNING in the record: nobody finished it. Another compressor reclaims it after the lease.
    assert (await front.service.get(job.job_id)).state == JS.JOB_RUNNING
    front.service.start_consuming()
    final = await wait_for(front, job.job_id, lambda j: j.state not in (JS.JOB_QUEUED, JS.JOB_RUNNING), 180)
    assert final.state == JS.JOB_SUCCEEDED, final.message
    assert final.attempts == 2
    versions = await front.registry.list_versions("digits")
    assert [v.ref.version for v in versions] == [1, 2]
    assert versions[1].lineage.job_id == "survivor" and versions[1].state == common_pb2.READY
    # Acknowledged: nothing is left pending in the consumer group.
    pending = await front.registry.redis.xpending(
        front.registry.keys.jobs_stream, front.registry.keys.jobs_group
    )
    assert pending["pending"] == 0
