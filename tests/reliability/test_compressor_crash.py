"""A compressor killed (-9) mid-job: the job is reclaimed by another compressor and completes exactly once.

A subprocess compressor takes the job and is killed while RUNNING; an in-process compressor reclaims it
after the lease and finishes it. Records how long until the job is picked up again, how long until it
finishes, how many attempts and how many versions it registered (exactly one).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from compressor.app import CompressorApp, start_compressor
from compressor.settings import CompressorSettings
from compressor.testing import register_digits
from mesh.store import ArtifactStore
from mesh_pb import common_pb2, compressor_pb2
from tests.reliability.harness import COMPRESSOR_READY, ServiceProcess, service_env, write_figures

JS = compressor_pb2.JobState
LEASE_S = 2.0
EPOCHS = 120


async def _wait_job(
    app: CompressorApp, job_id: str, predicate: Callable[[compressor_pb2.Job], bool], timeout_s: float
) -> compressor_pb2.Job:
    deadline = time.monotonic() + timeout_s
    while True:
        job = await app.service.get(job_id)
        if predicate(job):
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is {JS.Name(job.state)} {job.stage!r} after {timeout_s}s")
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_compressor_killed_mid_job_completes_once(
    redis_url: str, prefix: str, tmp_path: Path, figures_path: Path
) -> None:
    store = ArtifactStore(tmp_path / "models")
    front = await start_compressor(
        CompressorSettings(
            redis_url=redis_url, key_prefix=prefix, store_dir=store.root, var_dir=tmp_path / "var",
            lease_s=LEASE_S, poll_s=0.1, latency_iters=10, run_jobs=False, log_json=False,
        ),
        bind="127.0.0.1:0",
        consumer="front",
    )  # fmt: skip
    victim = ServiceProcess(
        "compressor",
        "compressor",
        service_env(
            redis_url,
            prefix,
            store.root,
            {
                "MAAS_VAR_DIR": str(tmp_path / "var-victim"),
                "MAAS_COMPRESSOR_BIND": "127.0.0.1:0",
                "MAAS_COMPRESSOR_LEASE_S": str(LEASE_S),
                "MAAS_COMPRESSOR_POLL_S": "0.1",
                "MAAS_COMPRESSOR_LATENCY_ITERS": "10",
                "MAAS_COMPRESSOR_TORCH_THREADS": "1",
            },
        ),
        tmp_path / "logs",
        COMPRESSOR_READY,
    )
    try:
        parent = await register_digits(front.registry, store)
        await asyncio.to_thread(victim.start, 90.0)
        job = await front.service.submit(
            compressor_pb2.SubmitJobRequest(
                source=common_pb2.ModelRef(name="digits"),
                steps=[
                    compressor_pb2.Step(
                        method="distill", params={"epochs": EPOCHS}, options={"student": "digits_mlp:32"}
                    )
                ],
                max_accuracy_drop=0.05,
                job_id="reliability-crash",
            )
        )
        running = await _wait_job(
            front,
            job.job_id,
            lambda j: j.state == JS.JOB_RUNNING and j.stage.startswith("distill epoch"),
            120,
        )
        stage_at_kill = running.stage
        t_kill = time.monotonic()
        victim.kill()
        assert (await front.service.get(job.job_id)).state == JS.JOB_RUNNING  # nobody finished it
        front.service.start_consuming()
        retaken = await _wait_job(front, job.job_id, lambda j: j.attempts >= 2, 60)
        t_retaken = time.monotonic()
        final = await _wait_job(
            front, job.job_id, lambda j: j.state not in (JS.JOB_QUEUED, JS.JOB_RUNNING), 180
        )
        t_done = time.monotonic()
        versions = await front.registry.list_versions("digits")
        from_job = [v for v in versions if v.lineage.job_id == job.job_id]
        pending = await front.registry.redis.xpending(
            front.registry.keys.jobs_stream, front.registry.keys.jobs_group
        )
    finally:
        victim.kill()
        await front.stop(grace_s=1.0)
    figures = {
        "stage_at_kill": stage_at_kill,
        "lease_s": LEASE_S,
        "kill_to_retaken_s": round(t_retaken - t_kill, 3),
        "kill_to_finished_s": round(t_done - t_kill, 3),
        "final_state": JS.Name(final.state),
        "attempts": final.attempts,
        "attempts_when_retaken": retaken.attempts,
        "versions_registered_by_job": len(from_job),
        "versions_of_model": [v.ref.version for v in versions],
        "stream_entries_pending": pending["pending"],
    }
    write_figures(figures_path, "fault_compressor_kill9_mid_job", figures)
    assert final.state == JS.JOB_SUCCEEDED, final.message
    assert final.attempts == 2
    assert len(from_job) == 1 and [v.ref.version for v in versions] == [
        parent.ref.version,
        from_job[0].ref.version,
    ]
    assert final.result.version == from_job[0].ref.version
    assert pending["pending"] == 0
