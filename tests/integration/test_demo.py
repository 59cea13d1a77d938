"""build_demo against a real registry and store: signatures, artifacts, datasets, idempotent re-runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mesh.registry import Registry
from mesh.store import ArtifactStore
from mesh_pb import common_pb2
from workers.demo import build_demo
from workers.models import TinyLM, accuracy, load_exported, load_module_state


async def _build(
    registry: Registry,
    store: ArtifactStore,
    names: tuple[str, ...] = ("digits", "tinylm", "encoder"),
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[common_pb2.ModelVersion]:
    # Short training and the tiny encoder keep the test fast; the registration path is the same.
    return await build_demo(
        registry,
        store,
        names=names,
        encoder_size="tiny",
        progress=progress,
        force=force,
        digits_epochs=12,
        tinylm_steps=15,
    )


def _sig(mv: common_pb2.ModelVersion) -> dict[str, object]:
    s = mv.signature
    return {
        "inputs": [(t.name, t.datatype, list(t.shape), t.optional) for t in s.inputs],
        "outputs": [(t.name, t.datatype, list(t.shape)) for t in s.outputs],
        "max_batch_size": s.max_batch_size,
        "decoupled": s.decoupled,
    }


async def test_build_demo_registers_three_versions(registry: Registry, store: ArtifactStore) -> None:
    messages: list[str] = []
    versions = await _build(registry, store, progress=messages.append)
    assert [mv.ref.name for mv in versions] == ["digits", "tinylm", "encoder"]
    assert all(mv.ref.version == 1 and mv.state == common_pb2.REGISTERED for mv in versions)
    assert messages
    digits, tinylm, encoder = versions

    assert _sig(digits) == {
        "inputs": [("pixels", "FP32", [-1, 64], False)],
        "outputs": [("logits", "FP32", [-1, 10])],
        "max_batch_size": 64,
        "decoupled": False,
    }
    assert digits.format == "torch_export" and digits.batching.enabled and digits.dtype == "fp32"
    assert _sig(tinylm) == {
        "inputs": [("prompt", "BYTES", [1], False), ("max_tokens", "INT32", [1], True)],
        "outputs": [("text", "BYTES", [1])],
        "max_batch_size": 0,
        "decoupled": True,
    }
    assert tinylm.format == "module_state" and not tinylm.batching.enabled
    assert _sig(encoder) == {
        "inputs": [("input_ids", "INT64", [-1, 128], False)],
        "outputs": [("embedding", "FP32", [-1, 64])],
        "max_batch_size": 64,
        "decoupled": False,
    }
    assert encoder.labels["size"] == "tiny"

    # Every artifact verifies against its registered digest, and the registry holds what we got back.
    for mv in versions:
        assert store.verify(mv.artifact_uri, mv.sha256).is_file()
        assert await registry.get_version(mv.ref.name, mv.ref.version) == mv

    # digits: datasets in the store, verified; the artifact reproduces the recorded accuracy.
    labels = digits.labels
    assert labels["task"] == "classification"
    data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for which in ("eval_data", "train_data"):
        path = store.verify(labels[f"{which}_uri"], labels[f"{which}_sha256"])
        with np.load(path, allow_pickle=False) as npz:
            data[which] = (npz["x"], npz["y"])
    x_eval, y_eval = data["eval_data"]
    assert x_eval.shape[1] == 64 and x_eval.dtype == np.float32 and len(x_eval) == len(y_eval)
    assert len(data["train_data"][0]) + len(x_eval) == 1797
    module = load_exported(store.resolve(digits.artifact_uri))
    acc = accuracy(module, x_eval, y_eval)
    assert acc == pytest.approx(float(labels["accuracy"]), abs=1e-4)
    assert digits.lineage.metrics["accuracy"] == pytest.approx(acc, abs=1e-4)
    with torch.no_grad():
        assert module(torch.as_tensor(x_eval[:7])).shape == (7, 10)

    # tinylm: a module_state the worker rebuilds with weights_only and streams from.
    lm, meta = load_module_state(store.resolve(tinylm.artifact_uri))
    assert meta["arch"] == "tinylm" and isinstance(lm, TinyLM)
    text = "".join(lm.generate("The ", 10))
    assert len(text) == 10 and text.isprintable()

    # A second run registers nothing new.
    again = await _build(registry, store)
    assert [(mv.ref.name, mv.ref.version) for mv in again] == [
        (mv.ref.name, mv.ref.version) for mv in versions
    ]
    for name in ("digits", "tinylm", "encoder"):
        assert len(await registry.list_versions(name)) == 1


async def test_force_and_other_encoder_size_register_new_versions(
    registry: Registry, store: ArtifactStore
) -> None:
    first = await _build(registry, store, names=("tinylm",))
    forced = await _build(registry, store, names=("tinylm",), force=True)
    assert first[0].ref.version == 1 and forced[0].ref.version == 2
    with pytest.raises(ValueError, match="names"):
        await build_demo(registry, store, names=("bogus",))


async def test_replicas_asked_for_are_registered_and_raised_on_a_rerun(
    registry: Registry, store: ArtifactStore
) -> None:
    # make up with two workers or more keeps each demo version on two (one worker may die).
    (first,) = await _build(registry, store, names=("tinylm",))
    assert first.min_replicas == 1
    (again,) = await build_demo(registry, store, names=("tinylm",), tinylm_steps=15, min_replicas=2)
    assert again.ref.version == first.ref.version and again.min_replicas == 2
    stored = await registry.get_version("tinylm", first.ref.version)
    assert stored.min_replicas == 2 and stored.labels == first.labels and stored.state == first.state
    # A rerun asking for fewer leaves the replicas an operator (or a bigger stack) asked for.
    (fewer,) = await _build(registry, store, names=("tinylm",))
    assert fewer.min_replicas == 2
    (digits,) = await build_demo(registry, store, names=("digits",), digits_epochs=2, min_replicas=2)
    assert digits.min_replicas == 2


def test_cli_build(redis_url: str, prefix: str, tmp_path: Path) -> None:
    from mesh.cli.demo import app

    args = ["build", "--models", "encoder", "--encoder-size", "tiny", "--redis-url", redis_url]
    args += ["--key-prefix", prefix, "--store-dir", str(tmp_path / "store"), "--replicas", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "encoder" in result.output and "REGISTERED" in result.output
    assert list((tmp_path / "store" / "encoder").glob("*/model.pt2"))

    async def replicas() -> int:
        registry = await Registry.connect(redis_url, prefix)
        try:
            return (await registry.get_version("encoder", 1)).min_replicas
        finally:
            await registry.close()

    assert asyncio.run(replicas()) == 2


def test_cli_build_errors_are_one_line_and_a_rerun_names_force(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    from mesh.cli.demo import app

    base = ["build", "--key-prefix", prefix, "--store-dir", str(tmp_path / "store")]
    cases = [
        (["--models", "nosuch", "--redis-url", redis_url], 2, "nosuch"),
        (["--models", "encoder", "--encoder-size", "huge", "--redis-url", redis_url], 2, "huge"),
        (["--models", "encoder", "--encoder-size", "tiny", "--redis-url", "redis://127.0.0.1:1"], 1, "UNAVAILABLE"),
    ]  # fmt: skip
    for extra, code, message in cases:
        result = CliRunner().invoke(app, base + extra, env={"COLUMNS": "200"})
        assert result.exit_code == code and message in result.output, result.output
        assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output

    args = [*base, "--models", "encoder", "--encoder-size", "tiny", "--redis-url", redis_url]
    assert CliRunner().invoke(app, args).exit_code == 0
    again = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert again.exit_code == 0 and "skipping (maas demo build --force rebuilds it)" in again.output, (
        again.output
    )
