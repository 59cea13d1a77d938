"""A worker on 127.0.0.1:0 driven by tritonclient (sync + aio) and the WorkerControl stub."""

from __future__ import annotations

import asyncio
import queue
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from tritonclient.utils import InferenceServerException

from mesh.server import open_channel
from mesh.store import ArtifactStore
from mesh.v2 import pb, pb_grpc
from mesh_pb import common_pb2, worker_pb2, worker_pb2_grpc
from tests.integration.test_worker_support import (
    boom_record,
    export_mlp,
    mlp,
    mlp_record,
    save_tinylm,
    script_boom,
    standalone_worker,
    tinylm_record,
    worker_settings,
)
from workers.app import WorkerApp, start_worker


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("worker-artifacts")
    return {
        "mlp": export_mlp(root / "mlp.pt2"),
        "boom": script_boom(root / "boom.ts"),
        "tinylm": save_tinylm(root / "tinylm.pt"),
    }


settings = worker_settings


@pytest.fixture
async def worker(store: ArtifactStore) -> AsyncIterator[WorkerApp]:
    async with standalone_worker(store) as app:
        yield app


def reference(x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return mlp()(torch.from_numpy(x)).numpy()


def pixels(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, (batch, 64)).astype(np.float32)


def infer_input(x: np.ndarray, name: str = "pixels") -> tc.InferInput:
    inp = tc.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def _worker_samples(model: str) -> dict[str, float]:
    """The worker's Prometheus series for `model` version 1, as the exposition format writes them."""
    from prometheus_client import REGISTRY, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        for sample in family.samples:
            if sample.name.startswith("maas_worker_") and sample.labels.get("model") == model:
                le = sample.labels.get("le")
                out[sample.name + (f"[{le}]" if le else "")] = sample.value
    return out


async def test_per_version_metrics(
    worker: WorkerApp, store: ArtifactStore, artifacts: dict[str, Path]
) -> None:
    await worker.manager.load(mlp_record(store, artifacts["mlp"], name="metered"))
    before = _worker_samples("metered")
    client = tca.InferenceServerClient(worker.address)
    try:
        for b in (1, 2, 3):
            await client.infer("metered", [infer_input(pixels(b))])
        with pytest.raises(InferenceServerException):  # wrong shape: counted as a request and a failure
            await client.infer("metered", [infer_input(np.zeros((1, 3), np.float32))])
    finally:
        await client.close()
    after = _worker_samples("metered")

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("maas_worker_requests_total") == 4
    assert delta("maas_worker_request_failures_total") == 1
    assert delta("maas_worker_batch_size_count") == 3
    assert delta("maas_worker_batch_size_sum") == 6
    # Cumulative buckets: batch 1 ≤ 1, batches 1 and 2 ≤ 2, all three ≤ 4 and above.
    assert [delta(f"maas_worker_batch_size_bucket[{le}]") for le in ("1.0", "2.0", "4.0", "+Inf")] == [
        1,
        2,
        3,
        3,
    ]
    for name in ("maas_worker_queue_seconds", "maas_worker_compute_seconds"):
        assert delta(f"{name}_count") == 3 == delta(f"{name}_bucket[+Inf]")
        assert delta(f"{name}_sum") > 0
    assert after["maas_worker_version_memory_bytes"] > 0


async def test_infer_metadata_config_statistics(
    worker: WorkerApp, store: ArtifactStore, artifacts: dict[str, Path]
) -> None:
    await worker.manager.load(mlp_record(store, artifacts["mlp"], delay_us=100))
    x = pixels(3)
    # sync client (in a thread: the server shares this event loop)
    client = tc.InferenceServerClient(worker.address)
    try:
        result = await asyncio.to_thread(client.infer, "mlp", [infer_input(x)], request_id="r-1")
        np.testing.assert_allclose(result.as_numpy("logits"), reference(x), rtol=1e-5, atol=1e-5)
        response = result.get_response()
        assert (response.id, response.model_name, response.model_version) == ("r-1", "mlp", "1")
        assert await asyncio.to_thread(client.is_server_live)
        assert await asyncio.to_thread(client.is_model_ready, "mlp", "1")
        assert not await asyncio.to_thread(client.is_model_ready, "mlp", "2")
    finally:
        client.close()

    aclient = tca.InferenceServerClient(worker.address)
    try:
        x2 = pixels(5, seed=1)
        result = await aclient.infer("mlp", [infer_input(x2)], model_version="1")
        np.testing.assert_allclose(result.as_numpy("logits"), reference(x2), rtol=1e-5, atol=1e-5)
        with pytest.raises(InferenceServerException) as err:
            await aclient.infer("mlp", [infer_input(x2)], model_version="7")
        assert err.value.status() == "StatusCode.NOT_FOUND"
        assert "'7'" in err.value.message() and "mlp" in err.value.message()
        # The worker parses versions like the gateway: "１" is not version 1, "²" no crash.
        for bad in ("１", "²", "9" * 4301):
            with pytest.raises(InferenceServerException) as err:
                await aclient.infer("mlp", [infer_input(x2)], model_version=bad)
            assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert err.value.message().startswith("model_version:")
            with pytest.raises(InferenceServerException) as err:
                await aclient.is_model_ready("mlp", bad)
            assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert not await aclient.is_model_ready("mlp", "7")
        with pytest.raises(InferenceServerException) as err:
            await aclient.infer("nope", [infer_input(x2)])
        assert err.value.status() == "StatusCode.NOT_FOUND"

        meta = await aclient.get_server_metadata()
        assert "statistics" in meta.extensions and "model_configuration" in meta.extensions
        assert "cuda_shared_memory" not in meta.extensions
        md = await aclient.get_model_metadata("mlp")
        assert md.versions == ["1"]
        assert [(i.name, i.datatype, list(i.shape)) for i in md.inputs] == [("pixels", "FP32", [-1, 64])]
        cfg = (await aclient.get_model_config("mlp")).config
        assert cfg.name == "mlp" and cfg.max_batch_size == 16 and cfg.platform
        assert list(cfg.input[0].dims) == [64] and list(cfg.output[0].dims) == [10]
        assert cfg.HasField("dynamic_batching") and not cfg.model_transaction_policy.decoupled

        stats = (await aclient.get_inference_statistics("mlp")).model_stats
        assert len(stats) == 1
        inf = stats[0].inference_stats
        assert inf.success.count == 2
        assert inf.compute_input.count == inf.compute_infer.count == inf.compute_output.count == 2
        assert stats[0].inference_count == 8

        index = await aclient.get_model_repository_index()
        assert [(m.name, m.version, m.state) for m in index.models] == [("mlp", "1", "READY")]
    finally:
        await aclient.close()

    # an unimplemented RPC answers UNIMPLEMENTED
    async with open_channel(worker.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as rpc:
            await stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
        assert rpc.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_concurrent_requests_are_batched(
    worker: WorkerApp, store: ArtifactStore, artifacts: dict[str, Path]
) -> None:
    await worker.manager.load(mlp_record(store, artifacts["mlp"], delay_us=20_000))
    client = tca.InferenceServerClient(worker.address)
    try:
        xs = [pixels(1 + i % 3, seed=i) for i in range(24)]
        results = await asyncio.gather(*(client.infer("mlp", [infer_input(x)]) for x in xs))
        for x, r in zip(xs, results, strict=True):
            np.testing.assert_allclose(r.as_numpy("logits"), reference(x), rtol=1e-5, atol=1e-5)
        st = (await client.get_inference_statistics("mlp", "1")).model_stats[0]
    finally:
        await client.close()
    assert st.execution_count < len(xs)
    assert max(b.batch_size for b in st.batch_stats) > 3
    assert st.inference_count == sum(x.shape[0] for x in xs)
    inf = st.inference_stats
    assert inf.compute_input.count == inf.compute_infer.count == inf.compute_output.count == len(xs)


async def test_deadline_expires_in_queue(
    worker: WorkerApp, store: ArtifactStore, artifacts: dict[str, Path]
) -> None:
    # A 2 s batching delay keeps a lone request queued: its deadline passes while it waits.
    sv = await worker.manager.load(mlp_record(store, artifacts["mlp"], delay_us=2_000_000))
    client = tca.InferenceServerClient(worker.address)
    try:
        with pytest.raises(InferenceServerException) as err:
            await client.infer("mlp", [infer_input(pixels(1))], timeout=100_000)  # request parameter, µs
        assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert "deadline" in err.value.message()
        with pytest.raises(InferenceServerException) as err:
            await client.infer("mlp", [infer_input(pixels(1))], client_timeout=0.2)  # gRPC deadline
        assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    finally:
        await client.close()
    for _ in range(100):
        if sv.batcher.queue_depth == 0 and sv.stats.fail.count == 2:
            break
        await asyncio.sleep(0.02)
    assert sv.batcher.queue_depth == 0
    assert sv.stats.fail.count == 2


def _stream_scenario(address: str, empty_final: bool) -> list[tuple[str, bool, bytes | None]]:
    """Runs a whole sync-client stream; returns (id, final, text) per response, errors as ("error", ...)."""
    got: queue.Queue[tuple[str, bool, bytes | None]] = queue.Queue()

    def callback(result: tc.InferResult | None, error: InferenceServerException | None) -> None:
        if error is not None:
            got.put(("error:" + error.message(), True, None))
            return
        assert result is not None
        resp = result.get_response()
        final = resp.parameters["triton_final_response"].bool_param
        text = result.as_numpy("text")
        got.put((resp.id, final, None if text is None else bytes(text[0])))

    client = tc.InferenceServerClient(address)
    out: list[tuple[str, bool, bytes | None]] = []
    try:
        client.start_stream(callback=callback)
        prompt = tc.InferInput("prompt", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([b"hello "], dtype=np.object_))
        max_tokens = tc.InferInput("max_tokens", [1], "INT32")
        max_tokens.set_data_from_numpy(np.array([10], dtype=np.int32))
        client.async_stream_infer(
            "tinylm", [prompt, max_tokens], request_id="s1", enable_empty_final_response=empty_final
        )
        # a bad request on the same stream: error_message, stream stays open
        bad = tc.InferInput("nope", [1], "BYTES")
        bad.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
        client.async_stream_infer("tinylm", [bad], request_id="s2")
        # asking for no tokens at all: refused the same way
        none = tc.InferInput("max_tokens", [1], "INT32")
        none.set_data_from_numpy(np.array([0], dtype=np.int32))
        client.async_stream_infer("tinylm", [prompt, none], request_id="s3")
        finals = 0
        while finals < 3:
            item = got.get(timeout=20)
            out.append(item)
            finals += item[1]
        client.stop_stream()  # must not hang: the server closes after half-close + drain
    finally:
        client.close()
    return out


@pytest.mark.parametrize("empty_final", [True, False])
async def test_streaming_decoupled(
    worker: WorkerApp, store: ArtifactStore, artifacts: dict[str, Path], empty_final: bool
) -> None:
    await worker.manager.load(tinylm_record(store, artifacts["tinylm"]))
    out = await asyncio.wait_for(asyncio.to_thread(_stream_scenario, worker.address, empty_final), 60)
    errors = [o[0] for o in out if o[0].startswith("error:")]
    assert len(errors) == 2 and any("nope" in e for e in errors)
    assert any("max_tokens: must be at least 1, got 0" in e for e in errors)
    data = [o for o in out if o[0] == "s1"]
    assert data[-1][1] is True and all(not final for _, final, _ in data[:-1])
    texts = [t for _, _, t in data if t is not None]
    if empty_final:
        assert data[-1][2] is None  # the empty final response carries no outputs
    assert len(texts) >= 3  # 10 characters in chunks of 4
    assert sum(len(t) for t in texts) == 10


def _grpc_error_stream(address: str) -> list[InferenceServerException | None]:
    """A sync-client stream opened with `triton_grpc_error: true`: a good request, then a bad one."""
    got: queue.Queue[InferenceServerException | None] = queue.Queue()
    client = tc.InferenceServerClient(address)
    try:
        client.start_stream(
            callback=lambda result, error: got.put(error), headers={"triton_grpc_error": "true"}
        )
        client.async_stream_infer("mlp", [infer_input(pixels(1))], request_id="ok")
        first = got.get(timeout=20)
        client.async_stream_infer("mlp", [infer_input(pixels(1), name="nope")], request_id="bad")
        second = got.get(timeout=20)
        client.stop_stream()  # the server already ended the stream: must not hang
    finally:
        client.close()
    return [first, second]


async def test_stream_grpc_error_mode(
    worker: WorkerApp, store: ArtifactStore, artifacts: dict[str, Path]
) -> None:
    await worker.manager.load(mlp_record(store, artifacts["mlp"], delay_us=0))
    first, second = await asyncio.wait_for(asyncio.to_thread(_grpc_error_stream, worker.address), 60)
    assert first is None
    assert isinstance(second, InferenceServerException)
    assert second.status() == "StatusCode.INVALID_ARGUMENT" and "nope" in str(second.message())


async def test_decoupled_model_refuses_unary(
    worker: WorkerApp, store: ArtifactStore, artifacts: dict[str, Path]
) -> None:
    await worker.manager.load(tinylm_record(store, artifacts["tinylm"]))
    client = tca.InferenceServerClient(worker.address)
    try:
        prompt = tc.InferInput("prompt", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
        with pytest.raises(InferenceServerException) as err:
            await client.infer("tinylm", [prompt])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "ModelStreamInfer" in err.value.message()
    finally:
        await client.close()


def _raw_request(name: str, inputs: list[tuple[str, str, list[int], bytes]]) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=name)
    for n, dt, shape, raw in inputs:
        req.inputs.add(name=n, datatype=dt, shape=shape)
        req.raw_input_contents.append(raw)
    return req


async def test_bad_inputs(worker: WorkerApp, store: ArtifactStore, artifacts: dict[str, Path]) -> None:
    await worker.manager.load(mlp_record(store, artifacts["mlp"]))
    await worker.manager.load(boom_record(store, artifacts["boom"]))
    await worker.manager.load(tinylm_record(store, artifacts["tinylm"]))
    good = np.zeros((2, 64), np.float32).tobytes()
    cases: list[tuple[pb.ModelInferRequest, str]] = [
        (_raw_request("mlp", [("pixel", "FP32", [2, 64], good)]), "name"),
        (_raw_request("mlp", [("pixels", "FP64", [1, 64], np.zeros((1, 64)).tobytes())]), "datatype"),
        (_raw_request("mlp", [("pixels", "FP32", [2, 63], good)]), "shape"),
        (_raw_request("mlp", [("pixels", "FP32", [2, 64], good[:-4])]), "raw_input_contents"),
        (
            _raw_request("mlp", [("pixels", "FP32", [17, 64], np.zeros((17, 64), np.float32).tobytes())]),
            "max_batch_size",
        ),
        (_raw_request("mlp", [("pixels", "FP32", [1, 1 << 40], b"")]), "shape"),
        (_raw_request("mlp", [("pixels", "FP32", [-3, 64], b"")]), "shape"),
        (_raw_request("tinylm", [("prompt", "BYTES", [1], struct.pack("<I", 50) + b"short")]), "prompt"),
    ]
    async with open_channel(worker.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for req, word in cases:
            with pytest.raises(grpc.aio.AioRpcError) as rpc:
                await stub.ModelInfer(req, timeout=10)
            assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (req.inputs, rpc.value.details())
            assert word in (rpc.value.details() or ""), rpc.value.details()

        # a model that raises fails that request only (INTERNAL), the next one succeeds
        x_bad = np.full((1, 4), -5000, np.float32)
        with pytest.raises(grpc.aio.AioRpcError) as rpc:
            await stub.ModelInfer(_raw_request("boom", [("x", "FP32", [1, 4], x_bad.tobytes())]), timeout=10)
        assert rpc.value.code() == grpc.StatusCode.INTERNAL
        assert "boom" in (rpc.value.details() or "")
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        resp = await stub.ModelInfer(_raw_request("boom", [("x", "FP32", [2, 4], x.tobytes())]), timeout=10)
        assert resp.model_version == "1" and list(resp.outputs[0].shape) == [2, 4]
        np.testing.assert_array_equal(
            np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(2, 4), x * 2
        )


async def test_lru_eviction_and_control(store: ArtifactStore, artifacts: dict[str, Path]) -> None:
    size = sum(p.numel() * 4 for p in mlp().parameters())
    app = await start_worker(settings(store, memory_budget_bytes=int(size * 2.5)))
    try:
        async with open_channel(app.address) as channel:
            control = worker_pb2_grpc.WorkerControlStub(channel)
            for v in (1, 2):
                await control.LoadVersion(
                    worker_pb2.LoadVersionRequest(version=mlp_record(store, artifacts["mlp"], version=v))
                )
            client = tca.InferenceServerClient(app.address)
            try:
                await asyncio.sleep(0.01)
                await client.infer(
                    "mlp", [infer_input(pixels(1))], model_version="1"
                )  # v1 most recently used
                stats = await control.LoadVersion(
                    worker_pb2.LoadVersionRequest(version=mlp_record(store, artifacts["mlp"], version=3))
                )
                loaded = sorted(lv.ref.version for lv in stats.loaded)
                assert loaded == [1, 3]
                assert stats.memory_used_bytes <= stats.memory_budget_bytes
                assert not await client.is_model_ready("mlp", "2")
                # "" resolves to the newest loaded version
                r = await client.infer("mlp", [infer_input(pixels(1))])
                assert r.get_response().model_version == "3"
                await control.UnloadVersion(
                    worker_pb2.UnloadVersionRequest(ref=common_pb2.ModelRef(name="mlp", version=3))
                )
                r = await client.infer("mlp", [infer_input(pixels(1))])
                assert r.get_response().model_version == "1"
                with pytest.raises(grpc.aio.AioRpcError) as rpc:
                    await control.UnloadVersion(
                        worker_pb2.UnloadVersionRequest(ref=common_pb2.ModelRef(name="mlp", version=3))
                    )
                assert rpc.value.code() == grpc.StatusCode.NOT_FOUND

                # tampered artifact: refused before any load
                rec = mlp_record(store, artifacts["mlp"], version=4)
                path = store.resolve(rec.artifact_uri)
                data = bytearray(path.read_bytes())
                data[len(data) // 2] ^= 0xFF
                path.write_bytes(bytes(data))
                with pytest.raises(grpc.aio.AioRpcError) as rpc:
                    await control.LoadVersion(worker_pb2.LoadVersionRequest(version=rec))
                assert rpc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "sha256" in (rpc.value.details() or "")
                assert not await client.is_model_ready("mlp", "4")

                # drain: new work refused with UNAVAILABLE
                drained = await control.Drain(worker_pb2.DrainRequest(timeout_s=2))
                assert drained.draining
                with pytest.raises(InferenceServerException) as err:
                    await client.infer("mlp", [infer_input(pixels(1))])
                assert err.value.status() == "StatusCode.UNAVAILABLE"
            finally:
                await client.close()
    finally:
        await app.stop(drain=False)


async def test_priority_parameter_and_output_parameters(
    worker: WorkerApp, store: ArtifactStore, artifacts: dict[str, Path]
) -> None:
    """tritonclient's priority= reaches the batcher (unary and stream); a classification output is refused."""
    await worker.manager.load(mlp_record(store, artifacts["mlp"], delay_us=5_000))
    x = pixels(2)
    sync = tc.InferenceServerClient(worker.address)
    try:
        r = await asyncio.to_thread(sync.infer, "mlp", [infer_input(x)], priority=1)
        np.testing.assert_allclose(r.as_numpy("logits"), reference(x), rtol=1e-5, atol=1e-5)
    finally:
        sync.close()
    client = tca.InferenceServerClient(worker.address)
    try:
        xs = [pixels(1 + i % 3, seed=i) for i in range(12)]
        results = await asyncio.gather(
            *(client.infer("mlp", [infer_input(x)], priority=i % 3) for i, x in enumerate(xs))
        )
        for xi, ri in zip(xs, results, strict=True):
            np.testing.assert_allclose(ri.as_numpy("logits"), reference(xi), rtol=1e-5, atol=1e-5)

        async def source() -> AsyncIterator[dict[str, object]]:
            yield {"model_name": "mlp", "inputs": [infer_input(x)], "request_id": "p", "priority": 2}

        streamed = [item async for item in client.stream_infer(source())]
        assert len(streamed) == 1 and streamed[0][1] is None, streamed
        np.testing.assert_allclose(streamed[0][0].as_numpy("logits"), reference(x), rtol=1e-5, atol=1e-5)

        with pytest.raises(InferenceServerException) as err:
            await client.infer(
                "mlp", [infer_input(x)], outputs=[tca.InferRequestedOutput("logits", class_count=3)]
            )
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "outputs[0].parameters['classification']" in err.value.message()
    finally:
        await client.close()


async def test_repository_load_and_unload_need_a_model_name(worker: WorkerApp) -> None:
    """An empty model_name is the caller's error (INVALID_ARGUMENT, as on the gateway), not a missing model."""
    async with open_channel(worker.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for call, request in (
            (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="")),
            (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as rpc:
                await call(request, timeout=10)
            assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (rpc.value.details() or "").startswith("model_name")
