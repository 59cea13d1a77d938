"""Issue #5 end to end: a version made by the compressor answers tritonclient through the gateway; a version
its accuracy gate rejected is never routed. Real Redis, compressor + router + worker + gateway in-process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc.aio as tca
from tritonclient.utils import InferenceServerException

from compressor.app import CompressorApp, start_compressor
from compressor.settings import CompressorSettings
from compressor.testing import digits_teacher, register_digits
from mesh.store import ArtifactStore
from mesh_pb import common_pb2, compressor_pb2, compressor_pb2_grpc, router_pb2
from tests.integration.gateway_stack import Stack, running_stack, wait_routable

JS = compressor_pb2.JobState
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
async def compressor(
    redis_url: str, prefix: str, store: ArtifactStore, tmp_path: Path
) -> AsyncIterator[CompressorApp]:
    settings = CompressorSettings(
        redis_url=redis_url, key_prefix=prefix, store_dir=store.root, var_dir=tmp_path / "var",
        lease_s=5.0, poll_s=0.1, latency_iters=5, torch_threads=1, log_json=False,
    )  # fmt: skip
    app = await start_compressor(settings, bind="127.0.0.1:0")
    try:
        yield app
    finally:
        await app.stop(grace_s=1.0)


async def run_job(address: str, request: compressor_pb2.SubmitJobRequest) -> compressor_pb2.Job:
    """Submits a job and follows WatchJob to its last event (bounded)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = compressor_pb2_grpc.CompressorServiceStub(channel)
        job = await stub.SubmitJob(request)
        final = job
        async for event in stub.WatchJob(compressor_pb2.WatchJobRequest(job_id=job.job_id), timeout=120):
            final = event.job
        return final


def table_versions(table: router_pb2.RouteTable, model: str) -> set[int]:
    return {vr.version for mr in table.models if mr.model == model for vr in mr.versions}


def infer_input(x: np.ndarray) -> tca.InferInput:
    inp = tca.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


async def test_compressed_version_answers_through_the_gateway_and_rejected_is_never_routed(
    redis_url: str, prefix: str, store: ArtifactStore, compressor: CompressorApp
) -> None:
    await register_digits(compressor.registry, store)
    teacher, (_, _, x_eval, _) = digits_teacher()
    int8 = await run_job(
        compressor.address,
        compressor_pb2.SubmitJobRequest(
            source=common_pb2.ModelRef(name="digits"),
            steps=[compressor_pb2.Step(method="int8_dynamic")],
            max_accuracy_drop=0.01,
            job_id="e2e-int8",
        ),
    )
    assert int8.state == JS.JOB_SUCCEEDED, int8.message
    new = int8.result.version
    mv = await compressor.registry.get_version("digits", new)
    assert mv.state == common_pb2.READY and mv.format == "torch_export"
    assert list(mv.lineage.methods) == ["int8_dynamic"] and mv.lineage.parent_version == 1

    gated = await run_job(
        compressor.address,
        compressor_pb2.SubmitJobRequest(
            source=common_pb2.ModelRef(name="digits", version=1),
            steps=[compressor_pb2.Step(method="prune_unstructured", params={"sparsity": 0.97})],
            max_accuracy_drop=0.0001,
            job_id="e2e-gated",
        ),
    )
    assert gated.state == JS.JOB_REJECTED, gated.message
    rejected = gated.result.version
    assert (await compressor.registry.get_version("digits", rejected)).state == common_pb2.REJECTED

    # The mesh starts on that registry: the router places the READY versions, never the rejected one.
    # (Started after the jobs: torch.export.load is not thread-safe, and the compressor and the worker
    # share this test's process; in the mesh they are separate processes.)
    async with running_stack(redis_url, prefix, store) as stack:
        await wait_routable(stack.gateway, "digits", 1)
        await wait_routable(stack.gateway, "digits", new)
        await check_compressed_answers(stack, new, teacher, x_eval)
        await check_rejected_never_routed(stack, rejected, gated.message)


async def check_compressed_answers(
    stack: Stack, version: int, teacher: torch.nn.Module, x: np.ndarray
) -> None:
    with torch.no_grad():
        expected = teacher(torch.from_numpy(x)).argmax(1).numpy()
    client = tca.InferenceServerClient(stack.gateway.address)
    try:
        chunks = [x[i : i + 60] for i in range(0, len(x), 60)]
        results = await asyncio.wait_for(
            asyncio.gather(
                *(client.infer("digits", [infer_input(c)], model_version=str(version)) for c in chunks)
            ),
            60,
        )
        assert {r.get_response().model_version for r in results} == {str(version)}
        logits = np.concatenate([r.as_numpy("logits") for r in results])
        assert logits.shape == (len(x), 10) and logits.dtype == np.float32
        agreement = float((logits.argmax(1) == expected).mean())
        assert agreement >= 0.95, f"int8 argmax agrees with the teacher on {agreement:.1%} of held-out rows"
    finally:
        await client.close()


async def check_rejected_never_routed(stack: Stack, version: int, gate_message: str) -> None:
    assert version not in table_versions(stack.router.service.table, "digits")
    assert version not in table_versions(stack.gateway.picker.table, "digits")
    for worker in stack.workers:
        assert version not in {sv.version for sv in worker.manager.model_versions("digits")}
    client = tca.InferenceServerClient(stack.gateway.address)
    try:
        x = digits_teacher()[1][2][:4]
        with pytest.raises(InferenceServerException) as err:
            await client.infer("digits", [infer_input(x)], model_version=str(version))
        assert err.value.status() == "StatusCode.NOT_FOUND"
        assert not await client.is_model_ready("digits", str(version))
        # Unversioned requests keep going to the stable version, never to the rejected one.
        results = await asyncio.gather(*(client.infer("digits", [infer_input(x)]) for _ in range(8)))
        assert {r.get_response().model_version for r in results} == {"1"}
        index = (await client.get_model_repository_index(as_json=True))["models"]
        row = next(m for m in index if m["name"] == "digits" and m.get("version") == str(version))
        assert row["state"] == "UNAVAILABLE" and row["reason"] == gate_message
    finally:
        await client.close()
