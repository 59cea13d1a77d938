"""ONNX Runtime as the worker's optional runtime: models built with onnx.helper (no torch exporter), stored in
the ArtifactStore, loaded on a real worker as format "onnx" and called with tritonclient."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from tritonclient.utils import InferenceServerException

from mesh.store import ArtifactStore
from mesh_pb import common_pb2
from tests.integration.test_worker_support import record, spec
from workers.app import WorkerApp, start_worker
from workers.settings import WorkerSettings

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

IN, OUT = 8, 4
RNG = np.random.default_rng(7)
W = RNG.normal(0, 0.5, (IN, OUT)).astype(np.float32)
B = RNG.normal(0, 0.5, (OUT,)).astype(np.float32)


def build_mlp_onnx(path: Path, *, fp16: bool = False, output_order: tuple[str, str] = ("y", "pre")) -> Path:
    """y = Relu(x @ W + B) and pre = x @ W + B, batch dim dynamic ("batch"). fp16: the whole graph in
    float16 (the wire stays FP32; the runtime casts at the boundary)."""
    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    dtype = np.float16 if fp16 else np.float32
    x = helper.make_tensor_value_info("x", elem, ["batch", IN])
    outs = {
        "y": helper.make_tensor_value_info("y", elem, ["batch", OUT]),
        "pre": helper.make_tensor_value_info("pre", elem, ["batch", OUT]),
    }
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["y"]),
        ],
        "mlp",
        [x],
        [outs[name] for name in output_order],
        initializer=[
            numpy_helper.from_array(W.astype(dtype), "W"),
            numpy_helper.from_array(B.astype(dtype), "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # onnxruntime 1.32 reads IR <= 11; 9 keeps older runtimes of the extra happy
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pre = x.astype(np.float64) @ W.astype(np.float64) + B.astype(np.float64)
    return np.maximum(pre, 0.0), pre


def onnx_record(
    store: ArtifactStore,
    src: Path,
    *,
    name: str = "onnx_mlp",
    version: int = 1,
    outputs: tuple[str, ...] = ("y", "pre"),
    input_name: str = "x",
    **kw: object,
) -> common_pb2.ModelVersion:
    art = store.put_file(name, version, src, "model.onnx")
    return record(
        name,
        version,
        art,
        fmt="onnx",
        inputs=[spec(input_name, "FP32", [-1, IN])],
        outputs=[spec(o, "FP32", [-1, OUT]) for o in outputs],
        **kw,  # type: ignore[arg-type]
    )


def batch(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, IN)).astype(np.float32)


def infer_input(x: np.ndarray, name: str = "x") -> tc.InferInput:
    inp = tc.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


@pytest.fixture
async def worker(store: ArtifactStore) -> AsyncIterator[WorkerApp]:
    settings = WorkerSettings(
        bind="127.0.0.1:0", store_dir=store.root, device="auto", registry=False, log_json=False
    )
    app = await start_worker(settings)
    try:
        yield app
    finally:
        await app.stop(drain=False)


async def test_onnx_model_answers_tritonclient(
    worker: WorkerApp, store: ArtifactStore, tmp_path: Path
) -> None:
    # The signature lists the outputs in another order than the graph: outputs map by name.
    path = build_mlp_onnx(tmp_path / "mlp.onnx", output_order=("pre", "y"))
    sv = await worker.manager.load(onnx_record(store, path, outputs=("y", "pre")))
    assert sv.memory_bytes > 0
    client = tca.InferenceServerClient(worker.address)
    try:
        x = batch(5, seed=1)
        result = await client.infer("onnx_mlp", [infer_input(x)], model_version="1", request_id="r1")
        y, pre = reference(x)
        np.testing.assert_allclose(result.as_numpy("y"), y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(result.as_numpy("pre"), pre, rtol=1e-5, atol=1e-5)
        assert result.as_numpy("y").dtype == np.float32
        assert result.get_response().id == "r1" and result.get_response().model_version == "1"

        # Only the output asked for; a batch of one (the dynamic dim accepts any size up to max_batch_size).
        one = batch(1, seed=2)
        only = await client.infer("onnx_mlp", [infer_input(one)], outputs=[tc.InferRequestedOutput("pre")])
        assert only.as_numpy("y") is None
        np.testing.assert_allclose(only.as_numpy("pre"), reference(one)[1], rtol=1e-5, atol=1e-5)

        config = (await client.get_model_config("onnx_mlp", as_json=True))["config"]
        assert config["platform"] == "onnxruntime_onnx" and config["backend"] == "onnxruntime"
        meta = await client.get_model_metadata("onnx_mlp", as_json=True)
        assert [i["shape"] for i in meta["inputs"]] == [["-1", str(IN)]]

        # A wrong inner dim is refused by the worker before ONNX Runtime sees it.
        with pytest.raises(InferenceServerException) as err:
            await client.infer("onnx_mlp", [infer_input(np.zeros((2, IN + 1), np.float32))])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        await client.close()


async def test_onnx_fp16_graph_keeps_an_fp32_wire(
    worker: WorkerApp, store: ArtifactStore, tmp_path: Path
) -> None:
    # An fp16 graph whose tensors the signature renames (Triton-style positional names): mapped by position.
    path = build_mlp_onnx(tmp_path / "mlp16.onnx", fp16=True)
    mv = onnx_record(
        store, path, name="onnx_fp16", dtype="fp16", input_name="input__0", outputs=("output__0", "output__1")
    )
    await worker.manager.load(mv)
    client = tc.InferenceServerClient(worker.address)
    try:
        x = batch(3, seed=3)
        # the sync client in a thread: the server runs on this event loop
        result = await asyncio.to_thread(client.infer, "onnx_fp16", [infer_input(x, "input__0")])
        y, pre = reference(x)
        assert result.as_numpy("output__0").dtype == np.float32
        np.testing.assert_allclose(result.as_numpy("output__0"), y, rtol=2e-2, atol=2e-2)
        np.testing.assert_allclose(result.as_numpy("output__1"), pre, rtol=2e-2, atol=2e-2)
    finally:
        client.close()


async def test_onnx_dynamic_batching_merges_and_splits(
    worker: WorkerApp, store: ArtifactStore, tmp_path: Path
) -> None:
    path = build_mlp_onnx(tmp_path / "mlp.onnx")
    # A long queue delay: the first request waits for the others, which are all sent at once.
    await worker.manager.load(
        onnx_record(store, path, name="onnx_batch", max_batch_size=64, delay_us=200_000)
    )
    sizes = [1, 3, 2, 5, 1, 4, 2, 6]
    xs = [batch(n, seed=10 + i) for i, n in enumerate(sizes)]
    client = tca.InferenceServerClient(worker.address)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(client.infer("onnx_batch", [infer_input(x)]) for x in xs)), 30
        )
        for x, res in zip(xs, results, strict=True):
            y, pre = reference(x)
            assert res.as_numpy("y").shape == (len(x), OUT)
            np.testing.assert_allclose(res.as_numpy("y"), y, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(res.as_numpy("pre"), pre, rtol=1e-5, atol=1e-5)
        stats = (await client.get_inference_statistics("onnx_batch", as_json=True))["model_stats"][0]
        assert int(stats["inference_count"]) == sum(sizes)
        # Requests were merged: fewer forward passes than requests, yet every answer is its own rows.
        assert int(stats["execution_count"]) < len(sizes)
    finally:
        await client.close()
