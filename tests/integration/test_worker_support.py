"""Tiny test models and ModelVersion records for the worker tests (built here, no training)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from torch import nn

from mesh.store import Artifact, ArtifactStore
from mesh_pb import common_pb2
from workers.app import WorkerApp, start_worker
from workers.settings import WorkerSettings


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def export_mlp(path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(mlp(), (torch.zeros(2, 64),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(path))
    return path


class Boom(nn.Module):
    """Doubles its input; raises on any value below -1000 (a model failing one request)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < -1000.0).any()):
            raise RuntimeError("boom: negative sentinel")
        return x * 2.0


def script_boom(path: Path) -> Path:
    torch.jit.script(Boom()).save(str(path))
    return path


def save_tinylm(path: Path) -> Path:
    from workers.models import build, save_module_state

    torch.manual_seed(0)
    module = build("tinylm", {"d_model": 32, "n_heads": 2, "n_layers": 1, "context": 32})
    return save_module_state(module, path)


def spec(name: str, datatype: str, shape: list[int], optional: bool = False) -> common_pb2.TensorSpec:
    return common_pb2.TensorSpec(name=name, datatype=datatype, shape=shape, optional=optional)


def record(
    name: str,
    version: int,
    art: Artifact,
    *,
    fmt: str,
    inputs: list[common_pb2.TensorSpec],
    outputs: list[common_pb2.TensorSpec],
    max_batch_size: int = 16,
    delay_us: int = 0,
    batching: bool = True,
    max_queue_size: int = 0,
    decoupled: bool = False,
    dtype: str = "fp32",
) -> common_pb2.ModelVersion:
    mv = common_pb2.ModelVersion(
        ref=common_pb2.ModelRef(name=name, version=version),
        state=common_pb2.READY,
        artifact_uri=art.uri,
        sha256=art.sha256,
        format=fmt,
        dtype=dtype,
        size_bytes=art.size_bytes,
    )
    mv.signature.inputs.extend(inputs)
    mv.signature.outputs.extend(outputs)
    mv.signature.max_batch_size = max_batch_size
    mv.signature.decoupled = decoupled
    mv.batching.enabled = batching
    mv.batching.max_queue_delay_us = delay_us
    mv.batching.max_queue_size = max_queue_size
    return mv


def export_record(
    store: ArtifactStore, path: Path, module: nn.Module, width_in: int, width_out: int, dtype: str = "fp32"
) -> common_pb2.ModelVersion:
    """Exports `module` (one FP32 input "x" [-1, width_in], one output "y" [-1, width_out]) into the
    store; returns its version record."""
    from workers.models.export import export_module

    art = store.put_file("m", 1, export_module(module, torch.zeros(2, width_in), path), "model.pt2")
    return record(
        "m",
        1,
        art,
        fmt="torch_export",
        inputs=[spec("x", "FP32", [-1, width_in])],
        outputs=[spec("y", "FP32", [-1, width_out])],
        dtype=dtype,
    )


def mlp_record(
    store: ArtifactStore, src: Path, name: str = "mlp", version: int = 1, **kw: object
) -> common_pb2.ModelVersion:
    art = store.put_file(name, version, src, "model.pt2")
    return record(
        name,
        version,
        art,
        fmt="torch_export",
        inputs=[spec("pixels", "FP32", [-1, 64])],
        outputs=[spec("logits", "FP32", [-1, 10])],
        **kw,  # type: ignore[arg-type]
    )


def boom_record(store: ArtifactStore, src: Path) -> common_pb2.ModelVersion:
    art = store.put_file("boom", 1, src, "model.ts")
    return record(
        "boom",
        1,
        art,
        fmt="torchscript",
        inputs=[spec("x", "FP32", [-1, 4])],
        outputs=[spec("y", "FP32", [-1, 4])],
        max_batch_size=8,
        delay_us=0,
    )


def tinylm_record(store: ArtifactStore, src: Path) -> common_pb2.ModelVersion:
    art = store.put_file("tinylm", 1, src, "model.pt")
    return record(
        "tinylm",
        1,
        art,
        fmt="module_state",
        inputs=[spec("prompt", "BYTES", [1]), spec("max_tokens", "INT32", [1], optional=True)],
        outputs=[spec("text", "BYTES", [1])],
        max_batch_size=0,
        batching=False,
        decoupled=True,
    )


def worker_settings(store: ArtifactStore, **kw: object) -> WorkerSettings:
    """A standalone worker (no registry) on a free loopback port, on the CPU, serving from `store`."""
    return WorkerSettings(bind="127.0.0.1:0", store_dir=store.root, device="cpu", registry=False, **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def standalone_worker(store: ArtifactStore, **kw: object) -> AsyncIterator[WorkerApp]:
    app = await start_worker(worker_settings(store, **kw))
    try:
        yield app
    finally:
        await app.stop(drain=False)
