"""The compressor service in-process against real Redis and real gRPC: jobs end to end, gate, bad submits."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from typer.testing import CliRunner, Result

from compressor.app import CompressorApp, start_compressor
from compressor.settings import CompressorSettings
from compressor.testing import digits_teacher, register_digits
from mesh.cli import app as cli_app
from mesh.registry import Registry
from mesh.store import ArtifactStore
from mesh_pb import common_pb2, compressor_pb2, compressor_pb2_grpc

JS = compressor_pb2.JobState


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
async def compressor(redis_url: str, prefix: str, tmp_path: Path) -> AsyncIterator[CompressorApp]:
    settings = CompressorSettings(
        redis_url=redis_url, key_prefix=prefix, store_dir=tmp_path / "models", var_dir=tmp_path / "var",
        lease_s=5.0, poll_s=0.1, latency_iters=10, log_json=False,
    )  # fmt: skip
    app = await start_compressor(settings, bind="127.0.0.1:0")
    try:
        yield app
    finally:
        await app.stop(grace_s=1.0)


@pytest.fixture
async def stub(compressor: CompressorApp) -> AsyncIterator[compressor_pb2_grpc.CompressorServiceStub]:
    async with grpc.aio.insecure_channel(compressor.address) as channel:
        yield compressor_pb2_grpc.CompressorServiceStub(channel)


@pytest.fixture
async def digits(compressor: CompressorApp, tmp_path: Path) -> common_pb2.ModelVersion:
    return await register_digits(compressor.registry, ArtifactStore(tmp_path / "models"))


def step(method: str, options: dict[str, str] | None = None, **params: float) -> compressor_pb2.Step:
    return compressor_pb2.Step(method=method, params=params, options=options or {})


async def follow(stub: compressor_pb2_grpc.CompressorServiceStub, job_id: str) -> list[compressor_pb2.Job]:
    events = []
    async for event in stub.WatchJob(compressor_pb2.WatchJobRequest(job_id=job_id), timeout=120):
        events.append(event.job)
    return events


def eval_accuracy_of_artifact(store: ArtifactStore, mv: common_pb2.ModelVersion) -> float:
    """What a worker would score: load the verified .pt2 and classify the held-out split."""
    _, (_, _, x_eval, y_eval) = digits_teacher()
    program = torch.export.load(str(store.verify(mv.artifact_uri, mv.sha256))).module()
    with torch.no_grad():
        logits = program(torch.as_tensor(x_eval))
    return float((logits.argmax(1).numpy() == y_eval).mean())


async def test_int8_job_end_to_end_registers_one_ready_version(
    compressor: CompressorApp,
    stub: compressor_pb2_grpc.CompressorServiceStub,
    digits: common_pb2.ModelVersion,
    tmp_path: Path,
) -> None:
    registry: Registry = compressor.registry
    req = compressor_pb2.SubmitJobRequest(
        source=common_pb2.ModelRef(name="digits"), steps=[step("int8_dynamic")], max_accuracy_drop=0.01,
        canary_percent=10, job_id="int8-job",
    )  # fmt: skip
    job = await stub.SubmitJob(req)
    assert job.state == JS.JOB_QUEUED and job.source.version == digits.ref.version
    events = await follow(stub, job.job_id)
    final = events[-1]
    assert final.state == JS.JOB_SUCCEEDED, final.message
    assert [e.progress for e in events] == sorted(e.progress for e in events)
    assert any(e.state == JS.JOB_RUNNING for e in events) and final.progress == 1.0

    versions = await registry.list_versions("digits")
    assert [v.ref.version for v in versions] == [1, 2]
    mv = versions[1]
    assert mv.state == common_pb2.READY and final.result.version == 2
    assert mv.lineage.parent_version == 1 and list(mv.lineage.methods) == ["int8_dynamic"]
    assert mv.lineage.job_id == "int8-job" and mv.format == "torch_export"
    store = ArtifactStore(tmp_path / "models")
    accuracy = eval_accuracy_of_artifact(store, mv)
    assert final.report.accuracy == pytest.approx(accuracy)
    assert mv.lineage.metrics["accuracy"] == pytest.approx(accuracy)
    assert final.report.parent_accuracy - accuracy <= 0.01
    assert mv.lineage.metrics["parent_linear_weight_bytes"] / mv.lineage.metrics["linear_weight_bytes"] >= 3.5
    assert final.report.size_bytes == store.resolve(mv.artifact_uri).stat().st_size
    assert final.report.params == final.report.parent_params == 167_178

    # The canary gets 10% of the traffic, the parent the rest.
    assert await registry.get_traffic("digits") == [(1, 90.0), (2, 10.0)]
    # Resubmitting the same job id returns the job and registers nothing more.
    again = await stub.SubmitJob(req)
    assert again.job_id == "int8-job" and again.state == JS.JOB_SUCCEEDED
    assert len(await registry.list_versions("digits")) == 2
    listed = await stub.ListJobs(compressor_pb2.ListJobsRequest())
    assert [j.job_id for j in listed.jobs] == ["int8-job"]


async def test_gated_job_registers_rejected(
    compressor: CompressorApp,
    stub: compressor_pb2_grpc.CompressorServiceStub,
    digits: common_pb2.ModelVersion,
) -> None:
    job = await stub.SubmitJob(
        compressor_pb2.SubmitJobRequest(
            source=common_pb2.ModelRef(name="digits", version=1),
            steps=[step("prune_unstructured", sparsity=0.97)],
            max_accuracy_drop=0.0001,
            canary_percent=50,
        )
    )
    final = (await follow(stub, job.job_id))[-1]
    assert final.state == JS.JOB_REJECTED
    assert "points below" in final.message
    assert final.report.parent_accuracy - final.report.accuracy > 0.0001
    mv = await compressor.registry.get_version("digits", final.result.version)
    assert mv.state == common_pb2.REJECTED and mv.reason == final.message
    assert mv.lineage.job_id == job.job_id
    # Never routed: no traffic leg, and the default resolution still lands on the parent.
    assert await compressor.registry.get_traffic("digits") == []
    assert await compressor.registry.resolve("digits", "") == 1


async def test_distill_then_prune_job(
    compressor: CompressorApp,
    stub: compressor_pb2_grpc.CompressorServiceStub,
    digits: common_pb2.ModelVersion,
) -> None:
    job = await stub.SubmitJob(
        compressor_pb2.SubmitJobRequest(
            source=common_pb2.ModelRef(name="digits"),
            steps=[
                step("distill", {"student": "digits_mlp:128"}, epochs=30),
                step("prune_structured", epochs=3),
            ],
            max_accuracy_drop=0.03,
        )
    )
    final = (await follow(stub, job.job_id))[-1]
    assert final.state == JS.JOB_SUCCEEDED, final.message
    mv = await compressor.registry.get_version("digits", final.result.version)
    assert (
        mv.labels["arch"] == "digits_mlp" and mv.labels["arch_config"] == '{"dropout": 0.0, "hidden": [64]}'
    )
    assert final.report.params == 64 * 64 + 64 + 64 * 10 + 10


@pytest.mark.parametrize(
    ("request_fields", "code", "field"),
    [
        ({"source": {"name": "nope"}}, grpc.StatusCode.NOT_FOUND, "source.name"),
        ({"source": {"name": "digits", "version": 9}}, grpc.StatusCode.NOT_FOUND, "source.version"),
        ({"source": {"name": ""}}, grpc.StatusCode.INVALID_ARGUMENT, "source.name"),
        ({"steps": [("quantum", {}, {})]}, grpc.StatusCode.INVALID_ARGUMENT, "steps[0].method"),
        ({"steps": [("prune_unstructured", {"sparsity": 1.5}, {})]}, grpc.StatusCode.INVALID_ARGUMENT,
         "steps[0].params.sparsity"),
        ({"steps": [("distill", {}, {"student": "digits_mlp:x"})]}, grpc.StatusCode.INVALID_ARGUMENT,
         "steps[0].options.student"),
        ({"steps": [("int8_dynamic", {}, {}), ("fp16", {}, {})]}, grpc.StatusCode.INVALID_ARGUMENT,
         "steps[1].method"),
        ({"steps": [("float8_weight_only", {}, {})], "device": "cpu"}, grpc.StatusCode.INVALID_ARGUMENT,
         "steps[0].method"),
        ({"max_accuracy_drop": 2.0}, grpc.StatusCode.INVALID_ARGUMENT, "max_accuracy_drop"),
        ({"canary_percent": 100.0}, grpc.StatusCode.INVALID_ARGUMENT, "canary_percent"),
        ({"device": "tpu"}, grpc.StatusCode.INVALID_ARGUMENT, "device"),
        ({"job_id": "no spaces"}, grpc.StatusCode.INVALID_ARGUMENT, "job_id"),
    ],
)  # fmt: skip
async def test_bad_submits_name_the_field(
    stub: compressor_pb2_grpc.CompressorServiceStub,
    digits: common_pb2.ModelVersion,
    request_fields: dict,  # type: ignore[type-arg]
    code: grpc.StatusCode,
    field: str,
) -> None:
    source = request_fields.get("source", {"name": "digits"})
    steps = request_fields.get("steps", [("int8_dynamic", {}, {})])
    req = compressor_pb2.SubmitJobRequest(
        source=common_pb2.ModelRef(**source),
        steps=[compressor_pb2.Step(method=m, params=p, options=o) for m, p, o in steps],
        max_accuracy_drop=request_fields.get("max_accuracy_drop", 0.01),
        canary_percent=request_fields.get("canary_percent", 0.0),
        device=request_fields.get("device", ""),
        job_id=request_fields.get("job_id", ""),
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SubmitJob(req)
    assert err.value.code() == code
    assert (err.value.details() or "").startswith(field + ":"), err.value.details()
    assert (await stub.ListJobs(compressor_pb2.ListJobsRequest())).jobs == []


async def test_student_that_does_not_fit_and_missing_data(
    compressor: CompressorApp, stub: compressor_pb2_grpc.CompressorServiceStub, tmp_path: Path
) -> None:
    store = ArtifactStore(tmp_path / "models")
    # A model whose signature declares 5 logits: a digits_mlp student (10 logits) does not fit it.
    await register_digits(compressor.registry, store, model="five", outputs=5)
    await register_digits(compressor.registry, store, model="bare", with_eval=False, with_train=False)
    cases = [
        (
            "five",
            step("distill", {"student": "digits_mlp:32"}),
            "steps[0].options.student: student outputs shape",
        ),
        ("bare", step("int8_dynamic"), "source.version: bare:1 has no evaluation data"),
        ("bare", step("prune_structured", epochs=2), "source.version: bare:1 has no evaluation data"),
    ]
    for model, st, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SubmitJob(
                compressor_pb2.SubmitJobRequest(source=common_pb2.ModelRef(name=model), steps=[st])
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith(message), err.value.details()


async def test_cancel_a_running_job(
    compressor: CompressorApp,
    stub: compressor_pb2_grpc.CompressorServiceStub,
    digits: common_pb2.ModelVersion,
) -> None:
    job = await stub.SubmitJob(
        compressor_pb2.SubmitJobRequest(
            source=common_pb2.ModelRef(name="digits"),
            steps=[step("distill", {"student": "digits_mlp:32"}, epochs=5000)],
            max_accuracy_drop=0.05,
        )
    )
    async for event in stub.WatchJob(compressor_pb2.WatchJobRequest(job_id=job.job_id), timeout=60):
        if event.job.state == JS.JOB_RUNNING and event.job.stage.startswith("distill epoch"):
            cancelled = await stub.CancelJob(compressor_pb2.CancelJobRequest(job_id=job.job_id))
            assert cancelled.state in (JS.JOB_RUNNING, JS.JOB_CANCELLED)
    final = await stub.GetJob(compressor_pb2.GetJobRequest(job_id=job.job_id))
    assert final.state == JS.JOB_CANCELLED
    assert len(await compressor.registry.list_versions("digits")) == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CancelJob(compressor_pb2.CancelJobRequest(job_id=job.job_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetJob(compressor_pb2.GetJobRequest(job_id="missing"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and (err.value.details() or "").startswith("job_id:")


def test_numpy_reference_sanity() -> None:
    # The held-out split the tests score on is the one registered with the model.
    _, (_, _, x_eval, y_eval) = digits_teacher()
    assert x_eval.shape == (360, 64) and np.isin(y_eval, np.arange(10)).all()


LONG_ID = "distill-digits-mlp-32-a-long-client-chosen-job-id-01"


async def _maas(*args: str) -> Result:
    # The CLI runs its own event loop: it runs in a thread while the compressor serves on this one.
    return await asyncio.to_thread(CliRunner().invoke, cli_app, list(args), env={"COLUMNS": "80"})


async def test_cli_job_id_reuse_watch_list_and_unknown_params(
    compressor: CompressorApp,
    stub: compressor_pb2_grpc.CompressorServiceStub,
    digits: common_pb2.ModelVersion,
) -> None:
    address = ["--address", compressor.address]
    # A --param no step knows is refused before anything is submitted, naming the key and the known ones.
    result = await _maas("compress", "digits", "-m", "prune_unstructured", "-p", "bogus=1", *address)
    assert result.exit_code == 2 and "bogus" in result.output and "sparsity" in result.output, result.output
    result = await _maas("compress", "digits", "-m", "int8", "--student", "digits_mlp:32", *address)
    assert result.exit_code == 2 and "--student" in result.output, result.output
    assert (await stub.ListJobs(compressor_pb2.ListJobsRequest())).jobs == []

    long_job = ["compress", "digits", "-m", "distill", "--student", "digits_mlp:32", "-p", "epochs=5000"]
    long_job += ["--max-accuracy-drop", "0.05", "--job-id", LONG_ID, "--detach", *address]
    result = await _maas(*long_job)
    assert result.exit_code == 0 and f"{LONG_ID} queued" in result.output.replace("\n", ""), result.output
    async for event in stub.WatchJob(compressor_pb2.WatchJobRequest(job_id=LONG_ID), timeout=60):
        if event.job.state == JS.JOB_RUNNING:
            break
    try:
        # The same request attaches and says where the job really is.
        result = await _maas(*long_job)
        assert result.exit_code == 0 and "exists, RUNNING" in result.output, result.output
        # The same id with another request is refused, by the service and so by the CLI.
        other = compressor_pb2.SubmitJobRequest(
            source=common_pb2.ModelRef(name="digits"), job_id=LONG_ID, max_accuracy_drop=0.05,
            steps=[step("distill", {"student": "digits_mlp:32"}, epochs=4000)],
        )  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SubmitJob(other)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert (err.value.details() or "").startswith("job_id:") and "steps[0]" in (err.value.details() or "")
        result = await _maas(*[a if a != "epochs=5000" else "epochs=4000" for a in long_job])
        assert result.exit_code == 1 and "ALREADY_EXISTS" in result.output, result.output

        # `jobs list` at 80 columns never cuts the id.
        result = await _maas("jobs", "list", *address)
        assert result.exit_code == 0 and LONG_ID in result.output.split(), result.output

        # Ctrl-C while watching leaves the job running and says how to follow or cancel it.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh.cli", "jobs", "watch", LONG_ID, *address,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
        )  # fmt: skip
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert LONG_ID.encode() in first and b"Ctrl-C" in first, first
        proc.send_signal(signal.SIGINT)
        out, err_text = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 130, (out, err_text)
        assert (
            f"maas jobs watch {LONG_ID}".encode() in err_text
            and f"maas jobs cancel {LONG_ID}".encode() in err_text
        )
        assert b"Traceback" not in err_text
        job = await stub.GetJob(compressor_pb2.GetJobRequest(job_id=LONG_ID))
        assert job.state == JS.JOB_RUNNING
    finally:
        await stub.CancelJob(compressor_pb2.CancelJobRequest(job_id=LONG_ID))

    # `jobs watch` follows the job to its end and exits as compress does (1 unless it succeeded).
    result = await _maas("jobs", "watch", LONG_ID, *address)
    assert result.exit_code == 1 and "CANCELLED" in result.output, result.output
