"""Builds the demo models (`digits`, `tinylm`, `encoder`) locally and registers them in the registry."""

from __future__ import annotations

import asyncio
import io
import logging
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mesh.errors import FailedPrecondition, ModelNotFound
from mesh.registry import Registry
from mesh.store import Artifact, ArtifactStore, sha256_file
from mesh_pb import common_pb2, registry_pb2

logger = logging.getLogger(__name__)

DEMO_MODELS = ("digits", "tinylm", "encoder")
# Label that marks a version built by this module; its value is the build key (model + preset).
DEMO_LABEL = "demo_build"
STABLE_ALIAS = "stable"
_DEAD = {common_pb2.FAILED, common_pb2.REJECTED, common_pb2.RETIRED}

Progress = Callable[[str], None]


@dataclass
class _Built:
    """One model ready to register: its files in a temp dir and its registry record."""

    filename: str
    path: Path
    format: str
    signature: common_pb2.Signature
    batching: common_pb2.BatchingConfig
    dtype: str
    labels: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    # Extra files stored next to the artifact: label prefix ("eval_data") -> local path.
    datasets: dict[str, Path] = field(default_factory=dict)


def _spec(name: str, datatype: str, shape: Sequence[int], optional: bool = False) -> common_pb2.TensorSpec:
    return common_pb2.TensorSpec(name=name, datatype=datatype, shape=list(shape), optional=optional)


def _save_npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    path.write_bytes(buf.getvalue())
    return path


def _build_digits(workdir: Path, seed: int, epochs: int, progress: Progress) -> _Built:
    import torch

    from workers.models.digits import DEFAULT_HIDDEN, load_digits_split, train_digits
    from workers.models.export import export_module

    data = load_digits_split(seed)
    x_train, y_train, x_eval, y_eval = data
    model = train_digits(DEFAULT_HIDDEN, epochs=epochs, seed=seed, data=data, progress=progress)
    info = model.training_info
    acc = info.accuracy if info is not None else float("nan")
    progress(f"digits: held-out accuracy {acc:.4f} ({info.train_seconds if info else 0:.1f} s)")
    path = export_module(model, torch.as_tensor(x_eval[:2]), workdir / "model.pt2")
    max_batch = 64
    return _Built(
        filename="model.pt2",
        path=path,
        format="torch_export",
        signature=common_pb2.Signature(
            inputs=[_spec("pixels", "FP32", [-1, 64])],
            outputs=[_spec("logits", "FP32", [-1, 10])],
            max_batch_size=max_batch,
        ),
        # No added delay: a lone request runs at once, and requests that queue while a batch computes
        # (or that the gateway coalesces) still merge into one forward pass.
        batching=common_pb2.BatchingConfig(enabled=True, max_queue_delay_us=0),
        dtype="fp32",
        labels={
            "task": "classification",
            "arch": model.arch,
            "arch_config": _json(model.config),
            "accuracy": f"{acc:.4f}",
            "description": "MLP over scikit-learn's 8x8 digits; pixels are raw 0-16 values",
        },
        metrics={"accuracy": acc},
        datasets={
            "eval_data": _save_npz(workdir / "eval.npz", x_eval, y_eval),
            "train_data": _save_npz(workdir / "train.npz", x_train, y_train),
        },
    )


def _build_tinylm(workdir: Path, seed: int, steps: int, progress: Progress) -> _Built:
    from workers.models.state import save_module_state
    from workers.models.tinylm import train_tinylm

    model = train_tinylm(steps=steps, seed=seed, progress=progress)
    info = model.training_info
    sample = "".join(model.generate("The worker ", 48))
    progress(f"tinylm: loss {info.final_loss if info else float('nan'):.3f}; sample: {sample!r}")
    path = save_module_state(model, workdir / "model.pt")
    return _Built(
        filename="model.pt",
        path=path,
        format="module_state",
        signature=common_pb2.Signature(
            inputs=[_spec("prompt", "BYTES", [1]), _spec("max_tokens", "INT32", [1], optional=True)],
            outputs=[_spec("text", "BYTES", [1])],
            max_batch_size=0,
            decoupled=True,
        ),
        batching=common_pb2.BatchingConfig(enabled=False),
        dtype="fp32",
        labels={
            "task": "text-generation",
            "arch": model.arch,
            "arch_config": _json(model.config),
            "description": "character-level transformer; streams a few characters per response",
        },
        metrics={"train_loss": info.final_loss} if info else {},
    )


def _build_encoder(workdir: Path, size: str, seed: int, progress: Progress) -> _Built:
    import torch

    from workers.models.encoder import build_encoder, encoder_config, example_input_ids
    from workers.models.export import export_module

    cfg = encoder_config(size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_encoder(cfg).eval()
    progress(f"encoder: exporting {size} ({cfg['layers']} layers × {cfg['hidden']})")
    path = export_module(
        model, example_input_ids(2, cfg["max_len"], cfg["vocab_size"]), workdir / "model.pt2"
    )
    hidden = int(cfg["hidden"])
    return _Built(
        filename="model.pt2",
        path=path,
        format="torch_export",
        signature=common_pb2.Signature(
            inputs=[_spec("input_ids", "INT64", [-1, cfg["max_len"]])],
            outputs=[_spec("embedding", "FP32", [-1, hidden])],
            max_batch_size=128 if size == "base" else 64,
        ),
        batching=common_pb2.BatchingConfig(enabled=True, max_queue_delay_us=1000),
        # base exists for GPU throughput, where bf16 is the point; small and tiny stay fp32 for CPUs.
        dtype="bf16" if size == "base" else "fp32",
        labels={
            "task": "embedding",
            "arch": model.arch,
            "arch_config": _json(model.config),
            "size": size,
            "description": "BERT-shaped encoder with random weights (throughput demo)",
        },
    )


def _json(value: object) -> str:
    import json

    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def build_key(name: str, encoder_size: str) -> str:
    """The demo build a version answers to: one per model, and per preset for the encoder."""
    return f"demo:{name}:{encoder_size}" if name == "encoder" else f"demo:{name}"


async def _demo_versions(registry: Registry, name: str, key: str) -> list[common_pb2.ModelVersion]:
    try:
        versions = await registry.list_versions(name)
    except ModelNotFound:
        return []
    return [mv for mv in versions if mv.labels.get(DEMO_LABEL) == key]


def _put(store: ArtifactStore, model: str, built: _Built) -> tuple[Artifact, dict[str, Artifact]]:
    # The version id is only known after registration, so files live in a directory named by the
    # artifact's digest: unique, never overwritten by another build, and the same for the same bytes.
    folder = sha256_file(built.path)[:16]
    artifact = store.put_file(model, folder, built.path, built.filename)
    extra = {label: store.put_file(model, folder, p, p.name) for label, p in built.datasets.items()}
    return artifact, extra


async def build_demo(
    registry: Registry,
    store: ArtifactStore,
    names: Sequence[str] = DEMO_MODELS,
    encoder_size: str = "small",
    progress: Progress | None = None,
    force: bool = False,
    *,
    seed: int = 0,
    digits_epochs: int = 30,
    tinylm_steps: int = 300,
    min_replicas: int = 1,
) -> list[common_pb2.ModelVersion]:
    """Trains/builds each named demo model, stores its artifact and registers a version (REGISTERED)
    that the router keeps on `min_replicas` workers.

    A model that already has a live demo version for the same build key is skipped (its latest
    version is returned, its min_replicas raised to `min_replicas` if lower) unless `force`. Training
    runs in a thread so the event loop stays free. Returns one ModelVersion per name, in order.
    """
    report: Progress = progress or (lambda msg: logger.info("%s", msg))
    unknown = [n for n in names if n not in DEMO_MODELS]
    if unknown:
        raise ValueError(f"names: unknown demo model(s) {unknown}; expected some of {list(DEMO_MODELS)}")
    from workers.models.encoder import encoder_config

    encoder_config(encoder_size)  # fail early on a bad preset name
    results: list[common_pb2.ModelVersion] = []
    for name in names:
        key = build_key(name, encoder_size)
        previous = await _demo_versions(registry, name, key)
        live = [mv for mv in previous if mv.state not in _DEAD]
        if live and not force:
            mv = live[-1]
            report(
                f"{name}: version {mv.ref.version} already built ({key}); skipping (maas demo build --force rebuilds it)"
            )
            if mv.min_replicas < min_replicas:
                mv.min_replicas = min_replicas
                mv = await registry.update_version(mv)
                report(f"{name}: version {mv.ref.version} kept on {min_replicas} workers")
            results.append(mv)
            continue
        report(f"{name}: building")
        with tempfile.TemporaryDirectory(prefix=f"maas-demo-{name}-") as tmp:
            workdir = Path(tmp)
            if name == "digits":
                built = await asyncio.to_thread(_build_digits, workdir, seed, digits_epochs, report)
            elif name == "tinylm":
                built = await asyncio.to_thread(_build_tinylm, workdir, seed, tinylm_steps, report)
            else:
                built = await asyncio.to_thread(_build_encoder, workdir, encoder_size, seed, report)
            artifact, extra = await asyncio.to_thread(_put, store, name, built)
        labels = {**built.labels, DEMO_LABEL: key}
        for label, art in extra.items():
            labels[f"{label}_uri"] = art.uri
            labels[f"{label}_sha256"] = art.sha256
        # The first build of a key uses the key itself, so two concurrent builds register once;
        # a forced rebuild (or one after the previous version died) needs a fresh key.
        idempotency_key = key if not previous else f"{key}:{uuid.uuid4().hex[:12]}"
        mv = await registry.register_version(
            registry_pb2.RegisterVersionRequest(
                model=name,
                artifact_uri=artifact.uri,
                sha256=artifact.sha256,
                size_bytes=artifact.size_bytes,
                format=built.format,
                signature=built.signature,
                batching=built.batching,
                dtype=built.dtype,
                lineage=common_pb2.Lineage(metrics=built.metrics),
                state=common_pb2.REGISTERED,
                min_replicas=max(1, min_replicas),
                labels=labels,
                idempotency_key=idempotency_key,
            )
        )
        report(f"{name}: registered version {mv.ref.version} ({artifact.uri}, {artifact.size_bytes} bytes)")
        await _try_stable_alias(registry, mv, report)
        results.append(mv)
    return results


async def _try_stable_alias(registry: Registry, mv: common_pb2.ModelVersion, report: Progress) -> None:
    # Aliases may only point at READY versions; a freshly registered one becomes READY when a worker
    # loads it, and whoever marks it READY sets `stable`. This covers registries set to start READY.
    if mv.state != common_pb2.READY:
        return
    try:
        await registry.set_alias(mv.ref.name, STABLE_ALIAS, mv.ref.version)
        report(f"{mv.ref.name}: alias {STABLE_ALIAS} -> {mv.ref.version}")
    except FailedPrecondition as exc:
        report(f"{mv.ref.name}: alias {STABLE_ALIAS} not set ({exc})")
