"""The gateway's multiplexed data path (maas.v1.WorkerInference/Infer) against a real worker on 127.0.0.1:0:
results matched by tag, batching across frames, per-frame errors that leave the stream open, cancel
frames, per-frame deadlines, and a drain that answers UNAVAILABLE then ends the stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc._utils import _get_inference_request

from gateway.upstream import StreamBroken, WorkerLink
from mesh.errors import DeadlineExceeded, InvalidArgument, Unavailable
from mesh.server import open_channel
from mesh.store import ArtifactStore
from mesh.v2 import pb
from mesh_pb import worker_pb2, worker_pb2_grpc
from tests.integration.test_worker import pixels, reference
from tests.integration.test_worker_support import export_mlp, mlp_record, standalone_worker
from workers.app import WorkerApp


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_mlp(tmp_path_factory.mktemp("mux") / "mlp.pt2")


@pytest.fixture
async def worker(store: ArtifactStore) -> AsyncIterator[WorkerApp]:
    async with standalone_worker(store) as app:
        yield app


@pytest.fixture
async def link(worker: WorkerApp) -> AsyncIterator[WorkerLink]:
    """The gateway's client for the worker's multiplexed stream, on a channel of its own."""
    channel = open_channel(worker.address)
    client = WorkerLink(channel, worker.address)
    try:
        yield client
    finally:
        await client.close()
        await channel.close()


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def request_bytes(x: np.ndarray, request_id: str = "", name: str = "pixels", model: str = "mlp") -> bytes:
    inp = tc.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    req = _get_inference_request(model, [inp], "", request_id, None, 0, False, False, 0, None, None)
    return bytes(req.SerializeToString())


def logits(data: bytes) -> np.ndarray:
    resp = pb.ModelInferResponse.FromString(data)
    assert resp.outputs[0].name == "logits"
    return np.frombuffer(resp.raw_output_contents[0], dtype=np.float32).reshape(list(resp.outputs[0].shape))


async def test_frames_are_answered_by_tag_and_batched(
    worker: WorkerApp, store: ArtifactStore, mlp_path: Path, link: WorkerLink
) -> None:
    await worker.manager.load(mlp_record(store, mlp_path, delay_us=20_000))
    xs = [pixels(1 + i % 3, seed=i) for i in range(20)]
    outs = await asyncio.gather(
        *(link.infer(request_bytes(x, f"r{i}"), 10.0, f"r{i}") for i, x in enumerate(xs))
    )
    for i, (x, data) in enumerate(zip(xs, outs, strict=True)):
        assert pb.ModelInferResponse.FromString(data).id == f"r{i}"
        np.testing.assert_allclose(logits(data), reference(x), rtol=1e-5, atol=1e-5)
    st = worker.manager.get("mlp", "1").stats
    assert st.execution_count < len(xs)  # frames of one stream merged into shared forward passes
    assert link.in_flight == 0

    # Bad requests fail alone, naming the field; the stream stays open for the next one.
    with pytest.raises(InvalidArgument, match="inputs"):
        await link.infer(request_bytes(pixels(1), name="nope"), None, "bad")
    with pytest.raises(InvalidArgument, match="request"):
        await link.infer(b"\xff\xff\xff", None, "garbage")
    np.testing.assert_allclose(
        logits(await link.infer(request_bytes(pixels(2)), None, "ok")),
        reference(pixels(2)),
        rtol=1e-5,
        atol=1e-5,
    )


async def test_deadline_and_cancel_frames_free_the_queue(
    worker: WorkerApp, store: ArtifactStore, mlp_path: Path, link: WorkerLink
) -> None:
    # A 2 s batching delay keeps a lone request queued.
    sv = await worker.manager.load(mlp_record(store, mlp_path, delay_us=2_000_000))
    with pytest.raises(DeadlineExceeded):
        await link.infer(request_bytes(pixels(1)), 0.1, "late")
    task = asyncio.create_task(link.infer(request_bytes(pixels(1)), None, "cancelled"))
    await until(lambda: sv.batcher.queue_depth == 1, "the request queued")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: sv.batcher.queue_depth == 0, "the cancel frame to take it out of the queue")
    assert sv.stats.success.count == 0


async def test_clients_giving_up_mid_write_leave_the_shared_stream_open(
    worker: WorkerApp, store: ArtifactStore, mlp_path: Path, link: WorkerLink
) -> None:
    # In grpc.aio, cancelling a task inside call.write() cancels the whole call: requests cancelled a
    # loop step or two after they start (while a write is under way) must not break the stream the
    # other requests share.
    await worker.manager.load(mlp_record(store, mlp_path, delay_us=0))
    await link.infer(request_bytes(pixels(1)), None, "open")
    stream = link._stream
    big = pixels(16, seed=9)  # a larger frame keeps the write busy longer
    for round_ in range(5):
        tasks = [
            asyncio.create_task(link.infer(request_bytes(big if i % 2 else pixels(1, seed=i)), None, f"r{i}"))
            for i in range(24)
        ]
        for _ in range(round_):
            await asyncio.sleep(0)
        for task in tasks[::2]:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for i, r in enumerate(results):
            if i % 2:
                assert isinstance(r, bytes), f"round {round_}, request {i}: {r!r}"
                np.testing.assert_allclose(logits(r), reference(big), rtol=1e-5, atol=1e-5)
            else:
                assert isinstance(r, asyncio.CancelledError | bytes)
    assert link._stream is stream  # never broken, never reopened


async def test_drain_refuses_frames_then_ends_the_stream(
    worker: WorkerApp, store: ArtifactStore, mlp_path: Path, link: WorkerLink
) -> None:
    await worker.manager.load(mlp_record(store, mlp_path, delay_us=0))
    await link.infer(request_bytes(pixels(1)), None, "before")
    assert await worker.drain(5.0)
    with pytest.raises(Unavailable, match="draining"):
        await link.infer(request_bytes(pixels(1)), None, "during")
    assert worker.mux is not None
    await worker.mux.close_streams()
    # The stream ended: the link notices, and opens a new one on next use.
    await until(lambda: link._stream is None, "the link to see the stream end")


async def test_a_dead_worker_fails_pending_frames_with_unavailable(
    worker: WorkerApp, store: ArtifactStore, mlp_path: Path, link: WorkerLink
) -> None:
    sv = await worker.manager.load(mlp_record(store, mlp_path, delay_us=2_000_000))
    task = asyncio.create_task(link.infer(request_bytes(pixels(1)), None, "orphan"))
    await until(lambda: sv.batcher.queue_depth == 1, "the request queued")
    await worker.host.server.stop(0)  # the transport goes away with the request in flight
    with pytest.raises(StreamBroken):
        await asyncio.wait_for(task, 10)
    assert isinstance(StreamBroken("x"), Unavailable)  # retried on another replica by the gateway


async def test_raw_stub_frames(worker: WorkerApp, store: ArtifactStore, mlp_path: Path) -> None:
    """The wire contract without the gateway's client: tags echo back, a half-close ends the stream."""
    await worker.manager.load(mlp_record(store, mlp_path, delay_us=0))
    channel = open_channel(worker.address)
    try:
        call = worker_pb2_grpc.WorkerInferenceStub(channel).Infer()
        await call.write(worker_pb2.InferFrame(tag=7, request=request_bytes(pixels(1)), request_id="a"))
        await call.write(worker_pb2.InferFrame(tag=9, request=request_bytes(pixels(1), model="nope")))
        await call.done_writing()
        results = {r.tag: r async for r in call}
        assert set(results) == {7, 9}
        assert results[7].code == 0 and results[7].response
        assert results[9].code == grpc.StatusCode.NOT_FOUND.value[0] and "nope" in results[9].message
        assert await call.code() == grpc.StatusCode.OK
    finally:
        await channel.close()
