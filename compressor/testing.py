"""Test and benchmark helpers: a digits teacher trained once per process, registered with its datasets."""

from __future__ import annotations

import functools
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mesh.registry import Registry
from mesh.store import ArtifactStore
from mesh_pb import common_pb2, registry_pb2


@functools.lru_cache(maxsize=2)
def digits_teacher(
    epochs: int = 30, seed: int = 0
) -> tuple[Any, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(teacher DigitsMLP 512-256 on CPU, (x_train, y_train, x_eval, y_eval)); trained once per process.
    Callers deep-copy the module before changing it."""
    from workers.models import load_digits_split, train_digits

    data = load_digits_split(seed)
    model = train_digits(epochs=epochs, seed=seed, data=data, device="cpu")
    return model, data


def digits_signature(outputs: int = 10) -> common_pb2.Signature:
    return common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="pixels", datatype="FP32", shape=[-1, 64])],
        outputs=[common_pb2.TensorSpec(name="logits", datatype="FP32", shape=[-1, outputs])],
        max_batch_size=64,
    )


def _npz(x: np.ndarray, y: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    return buf.getvalue()


async def register_digits(
    registry: Registry,
    store: ArtifactStore,
    *,
    model: str = "digits",
    with_eval: bool = True,
    with_train: bool = True,
    outputs: int = 10,
    state: int = common_pb2.READY,
) -> common_pb2.ModelVersion:
    """Stores the teacher as torch_export plus its eval/train .npz and registers it (READY, alias stable)."""
    from workers.models import export_module

    teacher, (x_train, y_train, x_eval, y_eval) = digits_teacher()
    labels = {"task": "classification", "arch": teacher.arch, "arch_config": json.dumps(teacher.config)}
    with tempfile.TemporaryDirectory(prefix="maas-digits-") as tmp:
        path = export_module(teacher, torch.as_tensor(x_eval[:2]), Path(tmp) / "model.pt2")
        art = store.put_file(model, "src", path, "model.pt2")
        for kind, blob in (("eval_data", _npz(x_eval, y_eval)), ("train_data", _npz(x_train, y_train))):
            if (kind == "eval_data" and not with_eval) or (kind == "train_data" and not with_train):
                continue
            p = Path(tmp) / f"{kind}.npz"
            p.write_bytes(blob)
            data_art = store.put_file(model, "src", p, f"{kind}.npz")
            labels[f"{kind}_uri"] = data_art.uri
            labels[f"{kind}_sha256"] = data_art.sha256
    mv = await registry.register_version(
        registry_pb2.RegisterVersionRequest(
            model=model,
            artifact_uri=art.uri,
            sha256=art.sha256,
            format="torch_export",
            signature=digits_signature(outputs),
            batching=common_pb2.BatchingConfig(enabled=True, max_queue_delay_us=100),
            dtype="fp32",
            state=state,  # type: ignore[arg-type]
            labels=labels,
        )
    )
    if state == common_pb2.READY:
        await registry.set_alias(model, "stable", mv.ref.version)
    return mv
