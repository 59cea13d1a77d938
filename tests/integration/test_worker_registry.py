"""A worker with a registry: preload at start (MAAS_WORKER_PRELOAD / settings.preload) and the v2 repository
RPCs (tritonclient load_model / unload_model), against a real Redis and a real worker on 127.0.0.1:0."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc.aio as tca
from tritonclient.utils import InferenceServerException

from mesh.registry import Registry
from mesh.store import ArtifactStore
from mesh_pb import common_pb2, registry_pb2
from tests.integration.gateway_stack import digits_signature, worker_settings
from tests.integration.test_worker_support import export_mlp, mlp
from workers.app import WorkerApp, start_worker
from workers.service import parse_preload
from workers.settings import WorkerSettings

VS = common_pb2.VersionState


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_mlp(tmp_path_factory.mktemp("registry-worker") / "mlp.pt2")


def reference(x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out: np.ndarray = mlp()(torch.from_numpy(x)).numpy()
    return out


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, (n, 64)).astype(np.float32)


def infer_input(x: np.ndarray) -> tca.InferInput:
    inp = tca.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


async def register(
    registry: Registry,
    store: ArtifactStore,
    src: Path,
    model: str,
    *,
    state: int = VS.REGISTERED,
    tamper: bool = False,
) -> int:
    """Stores the artifact and registers it; `tamper` then changes the stored bytes (sha256 mismatch)."""
    art = store.put_file(model, os.urandom(4).hex(), src, "model.pt2")
    mv = await registry.register_version(
        registry_pb2.RegisterVersionRequest(
            model=model,
            artifact_uri=art.uri,
            sha256=art.sha256,
            format="torch_export",
            signature=digits_signature(16),
            batching=common_pb2.BatchingConfig(enabled=True, max_queue_delay_us=0),
            dtype="fp32",
            state=state,  # type: ignore[arg-type]
        )
    )
    if tamper:
        with store.resolve(art.uri).open("ab") as fh:
            fh.write(b"tampered")
    return int(mv.ref.version)


async def start(redis_url: str, prefix: str, store: ArtifactStore, **kw: object) -> WorkerApp:
    return await start_worker(worker_settings(redis_url, prefix, store, **kw))


@pytest.fixture
async def client_of() -> AsyncIterator[list[tca.InferenceServerClient]]:
    clients: list[tca.InferenceServerClient] = []
    yield clients
    for c in clients:
        await c.close()


async def check_serves(client: tca.InferenceServerClient, model: str, version: str = "") -> None:
    x = pixels(4, seed=len(model))
    result = await client.infer(model, [infer_input(x)], model_version=version)
    np.testing.assert_allclose(result.as_numpy("logits"), reference(x), rtol=1e-4, atol=1e-5)


def test_preload_spec_parses_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAAS_WORKER_PRELOAD", "digits:2, encoder:latest,tinylm")
    assert parse_preload(WorkerSettings().preload) == [("digits", "2"), ("encoder", ""), ("tinylm", "")]


async def test_preload_moves_registered_to_ready_and_a_bad_sha256_fails_alone(
    redis_url: str,
    prefix: str,
    registry: Registry,
    store: ArtifactStore,
    mlp_path: Path,
    client_of: list[tca.InferenceServerClient],
) -> None:
    good = await register(registry, store, mlp_path, "mlp")
    bad = await register(registry, store, mlp_path, "guarded", tamper=True)
    assert good == bad == 1
    app = await start(redis_url, prefix, store, preload="mlp:1,guarded:latest")
    try:
        mv = await registry.get_version("mlp", good)
        assert mv.state == VS.READY, mv.reason
        failed = await registry.get_version("guarded", bad)
        assert failed.state == VS.FAILED and "sha256" in failed.reason

        client = tca.InferenceServerClient(app.address)
        client_of.append(client)
        # The worker keeps serving what did load; the failed version is not served and says why.
        await check_serves(client, "mlp", "1")
        assert await client.is_model_ready("mlp", "1")
        assert not await client.is_model_ready("guarded")
        with pytest.raises(InferenceServerException) as err:
            await client.infer("guarded", [infer_input(pixels(1))])
        assert err.value.status() == "StatusCode.NOT_FOUND"
        index = (await client.get_model_repository_index(as_json=True))["models"]
        states = {(m["name"], m.get("version", "")): m for m in index}
        assert states[("mlp", "1")]["state"] == "READY"
        assert states[("guarded", "1")]["state"] == "UNAVAILABLE"
        assert "sha256" in states[("guarded", "1")]["reason"]

        # The heartbeat advertises the loaded version only.
        workers = {w.worker_id: w for w in await registry.list_workers()}
        loaded = {(r.ref.name, r.ref.version) for r in workers[app.worker_id].loaded}
        assert loaded == {("mlp", 1)}
    finally:
        await app.stop(drain=False)


async def test_repository_load_and_unload_through_tritonclient(
    redis_url: str,
    prefix: str,
    registry: Registry,
    store: ArtifactStore,
    mlp_path: Path,
    client_of: list[tca.InferenceServerClient],
) -> None:
    await register(registry, store, mlp_path, "mlp", state=VS.READY)
    v2 = await register(registry, store, mlp_path, "mlp")  # REGISTERED: latest, not yet serving
    await register(registry, store, mlp_path, "guarded", tamper=True)
    app = await start(redis_url, prefix, store)
    try:
        client = tca.InferenceServerClient(app.address)
        client_of.append(client)
        assert not await client.is_model_ready("mlp")

        # load_model loads the version the registry resolves ("" = stable / latest READY: version 1).
        await client.load_model("mlp")
        assert await client.is_model_ready("mlp", "1")
        assert not await client.is_model_ready("mlp", str(v2))
        await check_serves(client, "mlp")
        assert (await registry.get_version("mlp", 1)).state == VS.READY

        # unload_model always sends parameters["unload_dependents"]; both values are accepted.
        await client.unload_model("mlp")
        assert not await client.is_model_ready("mlp", "1")
        with pytest.raises(InferenceServerException) as err:
            await client.infer("mlp", [infer_input(pixels(1))])
        assert err.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as err:
            await client.unload_model("mlp", unload_dependents=True)
        assert err.value.status() == "StatusCode.NOT_FOUND"
        await client.load_model("mlp")
        await client.unload_model("mlp", unload_dependents=True)
        assert not await client.is_model_ready("mlp")

        # Unknown model: NOT_FOUND; config overrides are refused; a tampered artifact is FAILED, not loaded.
        with pytest.raises(InferenceServerException) as err:
            await client.load_model("nope")
        assert err.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as err:
            await client.load_model("mlp", config='{"max_batch_size": 4}')
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        with pytest.raises(InferenceServerException) as err:
            await client.load_model("guarded")
        assert err.value.status() == "StatusCode.FAILED_PRECONDITION"
        assert "sha256" in err.value.message()
        failed = await registry.get_version("guarded", 1)
        assert failed.state == VS.FAILED and "sha256" in failed.reason
        assert not await client.is_model_ready("guarded")
    finally:
        await app.stop(drain=False)
