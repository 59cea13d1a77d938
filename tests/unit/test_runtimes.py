"""Runtimes: formats, compute dtypes cast at the boundary, quantized module_state, decoupled generate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mesh.errors import FailedPrecondition, InvalidArgument
from mesh.store import ArtifactStore
from tests.integration.test_worker_support import (
    boom_record,
    export_mlp,
    export_record,
    mlp,
    mlp_record,
    record,
    save_tinylm,
    script_boom,
    spec,
    tinylm_record,
)
from workers.runtimes import create_runtime, load_runtime, module_memory_bytes, select_device

CPU = torch.device("cpu")


def _reference(x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return mlp()(torch.tensor(x)).numpy()  # a copy: x may be a read-only view


@pytest.mark.parametrize(("dtype", "tol"), [("fp32", 1e-5), ("bf16", 0.1), ("fp16", 0.02)])
def test_torch_export_dtypes_keep_fp32_wire(
    store: ArtifactStore, tmp_path: Path, dtype: str, tol: float
) -> None:
    rec = mlp_record(store, export_mlp(tmp_path / "m.pt2"), dtype=dtype)
    rt = load_runtime(rec, store.resolve(rec.artifact_uri), CPU)
    x = np.random.default_rng(0).uniform(0, 1, (3, 64)).astype(np.float32)
    x.flags.writeable = False  # request tensors are read-only views of the request bytes
    out = rt.forward({"pixels": x})
    assert out["logits"].dtype == np.float32 and out["logits"].shape == (3, 10)
    np.testing.assert_allclose(out["logits"], _reference(x), atol=tol, rtol=tol)
    assert rt.memory_bytes == module_memory_bytes(mlp()) // (1 if dtype == "fp32" else 2)
    # The exported graph is called directly (lifted weights passed in) and agrees with the module path.
    assert rt._lifted is not None
    lifted = rt.forward({"pixels": x})["logits"]
    rt._lifted = None
    np.testing.assert_array_equal(lifted, rt.forward({"pixels": x})["logits"])


class _Counting(torch.nn.Module):
    """Mutates a buffer in forward: the exported graph does it in place on the tensor passed in."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("offset", torch.tensor(1.5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return x + self.offset


class _Constant(torch.nn.Module):
    """A non-persistent buffer and a tensor constant: both lifted, both passed in by the direct call."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.tensor(1.5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.tensor(2.0) + self.offset


@pytest.mark.parametrize("module", [_Counting(), _Constant()])
def test_torch_export_direct_graph_call(
    store: ArtifactStore, tmp_path: Path, module: torch.nn.Module
) -> None:
    rec = export_record(store, tmp_path / "m.pt2", module, 4, 4)
    rt = load_runtime(rec, store.resolve(rec.artifact_uri), CPU)
    assert rt._lifted is not None
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    counting = isinstance(module, _Counting)
    expected = x + 1.5 if counting else x * 2 + 1.5
    for _ in range(3):
        np.testing.assert_array_equal(rt.forward({"x": x})["y"], expected)
    if counting:  # the buffer the module holds is the one the graph updated
        assert float(rt.module.get_buffer("calls")) == 3 + 1  # + the warm-up call


def test_forward_on_a_serving_thread(store: ArtifactStore, tmp_path: Path) -> None:
    # The worker's loop and compute threads hold inference mode for good (serving_thread_init); a
    # forward there skips the per-call context and answers the same, and other threads are untouched.
    from concurrent.futures import ThreadPoolExecutor

    from workers.runtimes import serving_thread_init

    rec = mlp_record(store, export_mlp(tmp_path / "m.pt2"))
    rt = load_runtime(rec, store.resolve(rec.artifact_uri), CPU)
    x = np.random.default_rng(1).uniform(0, 1, (4, 64)).astype(np.float32)
    name = rt.input_names[0]
    here = rt.forward({name: x})
    with ThreadPoolExecutor(1, initializer=serving_thread_init, initargs=(1,)) as pool:
        held = pool.submit(torch.is_inference_mode_enabled).result()
        there = pool.submit(rt.forward, {name: x}).result()
    assert held and not torch.is_inference_mode_enabled()
    assert list(there) == list(here)
    for out, value in here.items():
        np.testing.assert_allclose(there[out], value, rtol=1e-6)
        np.testing.assert_allclose(value, _reference(x), rtol=1e-5, atol=1e-5)


def test_torchscript_runtime(store: ArtifactStore, tmp_path: Path) -> None:
    rec = boom_record(store, script_boom(tmp_path / "b.ts"))
    rt = load_runtime(rec, store.resolve(rec.artifact_uri), CPU)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(rt.forward({"x": x})["y"], x * 2)
    with pytest.raises(Exception, match="boom"):
        rt.forward({"x": np.full((1, 4), -5000, np.float32)})


def test_module_state_quantized(store: ArtifactStore, tmp_path: Path) -> None:
    from workers.models import build, save_module_state

    torch.manual_seed(0)
    module = build("digits_mlp", {"hidden": [32], "dropout": 0.0}).eval()
    path = save_module_state(module, tmp_path / "d.pt", quantize="int8_weight_only")
    art = store.put_file("digits", 1, path, "model.pt")
    rec = record(
        "digits",
        1,
        art,
        fmt="module_state",
        inputs=[spec("pixels", "FP32", [-1, 64])],
        outputs=[spec("logits", "FP32", [-1, 10])],
    )
    rt = load_runtime(rec, store.resolve(rec.artifact_uri), CPU)
    x = np.random.default_rng(1).uniform(0, 16, (4, 64)).astype(np.float32)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    out = rt.forward({"pixels": x})["logits"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=0.1)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.75


def test_decoupled_generate(store: ArtifactStore, tmp_path: Path) -> None:
    rec = tinylm_record(store, save_tinylm(tmp_path / "t.pt"))
    rt = load_runtime(rec, store.resolve(rec.artifact_uri), CPU)
    prompt = np.array([b"hello"], dtype=np.object_)
    chunks = list(rt.generate({"prompt": prompt, "max_tokens": np.array([9], np.int32)}))
    assert len(chunks) == 3
    assert all(c["text"].shape == (1,) and isinstance(c["text"][0], bytes) for c in chunks)
    assert sum(len(c["text"][0]) for c in chunks) == 9
    for bad in (0, -5):
        with pytest.raises(InvalidArgument, match=rf"^max_tokens: must be at least 1, got {bad}$"):
            list(rt.generate({"prompt": prompt, "max_tokens": np.array([bad], np.int32)}))


def test_a_generation_moving_between_threads_leaves_no_thread_in_inference_mode(
    store: ArtifactStore, tmp_path: Path
) -> None:
    # A paused generation resumes on whichever compute thread is free, and one abandoned by its client is
    # closed on another thread still: inference mode held across a yield ended on the wrong thread and
    # left this one (the test's own) in inference mode, where later training failed.
    from concurrent.futures import ThreadPoolExecutor

    from workers.runtimes import serving_thread_init

    rec = tinylm_record(store, save_tinylm(tmp_path / "t.pt"))
    rt = load_runtime(rec, store.resolve(rec.artifact_uri), CPU)
    prompt = np.array([b"hello"], dtype=np.object_)
    generation = rt.generate({"prompt": prompt, "max_tokens": np.array([30], np.int32)})
    with ThreadPoolExecutor(2, initializer=serving_thread_init, initargs=(1,)) as pool:
        first = pool.submit(next, generation).result()
        second = pool.submit(next, generation).result()
    assert first["text"][0] and second["text"][0]
    generation.close()  # abandoned here, on a thread that never held inference mode
    assert not torch.is_inference_mode_enabled()
    assert next(iter(rt.generate({"prompt": prompt, "max_tokens": np.array([3], np.int32)})))["text"][0]
    assert not torch.is_inference_mode_enabled()


def test_unknown_format_and_device(store: ArtifactStore, tmp_path: Path) -> None:
    rec = mlp_record(store, export_mlp(tmp_path / "m.pt2"))
    rec.format = "tensorflow"
    with pytest.raises(FailedPrecondition, match="format"):
        create_runtime(rec, tmp_path / "m.pt2", CPU)
    rec.format = "torch_export"
    rec.dtype = "int3"
    with pytest.raises(InvalidArgument, match="dtype"):
        create_runtime(rec, tmp_path / "m.pt2", CPU)
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert select_device("cpu") == CPU
    if not torch.cuda.is_available():
        with pytest.raises(FailedPrecondition, match="CUDA"):
            select_device("cuda")
