"""Integrity: an artifact whose bytes no longer match the registered sha256 is refused (FAILED, never
routed) while the previous version keeps serving through the gateway."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from mesh.registry import Registry
from mesh.store import ArtifactStore
from mesh_pb import common_pb2
from tests.reliability.conftest import SharedMesh
from tests.reliability.harness import (
    SteadyLoad,
    async_wait_until,
    fetch_table,
    make_digits_artifact,
    register_request,
    write_figures,
)


async def _infer(mesh: SharedMesh, model: str, version: str = "") -> tuple[np.ndarray, str]:
    client = grpcclient.InferenceServerClient(mesh.gateway_url)
    try:
        inp = grpcclient.InferInput("pixels", list(mesh.pixels.shape), "FP32")
        inp.set_data_from_numpy(mesh.pixels)
        result = await client.infer(
            model, [inp], model_version=version, headers=mesh.bearer(mesh.admin_key[1]), client_timeout=10.0
        )
        return result.as_numpy("logits"), result.get_response().model_version
    finally:
        await client.close()


@pytest.mark.slow
async def test_tampered_artifact_is_refused_and_previous_version_keeps_serving(
    shared_mesh: SharedMesh, redis_url: str, figures_path: Path
) -> None:
    mesh = shared_mesh
    stack = mesh.stack
    assert stack.router is not None
    good = make_digits_artifact(stack.store, "guarded", "v1", seed=3)
    pixels = mesh.pixels
    expected_v1 = good.reference(pixels)
    reg = await Registry.connect(redis_url, stack.prefix)
    try:
        await reg.register_version(register_request("guarded", good.artifact))

        async def v1_serves() -> bool:
            logits, version = await _infer(mesh, "guarded")
            return version == "1" and bool(np.allclose(logits, expected_v1, rtol=1e-4, atol=1e-4))

        await async_wait_until(v1_serves, 60.0, "guarded:1 served through the gateway")

        # v2: the registry records the sha256 of the bytes that were stored; then the file is replaced by
        # another (perfectly loadable) model, as an attacker with write access to the store would.
        honest = make_digits_artifact(stack.store, "guarded", "v2", seed=4)
        path = stack.store.resolve(honest.artifact.uri)
        with tempfile.TemporaryDirectory() as tmp:
            elsewhere = ArtifactStore(Path(tmp))
            evil = make_digits_artifact(elsewhere, "evil", "x", seed=5)
            path.write_bytes(elsewhere.resolve(evil.artifact.uri).read_bytes())
        assert not np.allclose(evil.reference(pixels), expected_v1, atol=1e-3)

        load = await SteadyLoad(
            mesh.gateway_url,
            "guarded",
            pixels,
            expected_v1,
            clients=2,
            headers=mesh.bearer(mesh.admin_key[1]),
            max_requests=20_000,
            max_seconds=60.0,
        ).start()
        endpoints_seen_for_v2 = 0
        try:
            await load.wait_ok(20, 30)
            t_reg = time.monotonic()
            mv2 = await reg.register_version(register_request("guarded", honest.artifact))
            assert mv2.ref.version == 2

            async def v2_failed() -> bool:
                nonlocal endpoints_seen_for_v2
                table = await fetch_table(stack.router.address)  # type: ignore[union-attr]
                for route in table.models:
                    for vr in route.versions:
                        if route.model == "guarded" and vr.version == 2:
                            endpoints_seen_for_v2 = max(endpoints_seen_for_v2, len(vr.endpoints))
                mv = await reg.get_version("guarded", 2)
                return mv.state == common_pb2.FAILED

            await async_wait_until(v2_failed, 60.0, "guarded:2 FAILED", interval_s=0.05)
            t_failed = time.monotonic()
            record = await reg.get_version("guarded", 2)
            await asyncio.sleep(1.0)  # keep serving a while after the refusal
            await load.wait_ok(20, 30)
        finally:
            report = await load.stop()

        # Pinned to the tampered version: refused with a clear status, never served.
        try:
            await _infer(mesh, "guarded", "2")
            pinned_code = "OK"
        except InferenceServerException as exc:
            pinned_code = (exc.status() or "").replace("StatusCode.", "")
        _, unpinned_version = await _infer(mesh, "guarded")
        model = await reg.get_model("guarded")
    finally:
        await reg.close()
    figures = {
        **report.summary(),
        "register_to_failed_s": round(t_failed - t_reg, 3),
        "failed_reason": record.reason[:200],
        "endpoints_ever_listed_for_tampered_version": endpoints_seen_for_v2,
        "pinned_tampered_version_status": pinned_code,
        "unpinned_served_version": unpinned_version,
        "stable_alias": model.aliases.get("stable", 0),
    }
    write_figures(figures_path, "integrity_tampered_artifact", figures)
    assert record.state == common_pb2.FAILED and "sha256" in record.reason
    assert endpoints_seen_for_v2 == 0
    assert pinned_code not in ("OK", "INTERNAL", "UNKNOWN")
    assert unpinned_version == "1"
    assert report.failed == 0, report.failure_details
    assert report.wrong == 0  # every answer came from v1
