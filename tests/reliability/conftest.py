"""Fixtures of the reliability tests: where figures go, and one mesh of subprocesses shared by the
hostile-input, integrity and auth tests (router, one worker, a gateway that requires API keys)."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mesh.registry import Registry
from mesh.testing import delete_prefix, unique_prefix
from mesh_pb import common_pb2, registry_pb2
from tests.reliability.harness import (
    DigitsArtifact,
    MeshStack,
    async_wait_until,
    make_digits_artifact,
    register_request,
)


@pytest.fixture(scope="session")
def figures_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """JSON file collecting every measured figure of the session (printed too)."""
    return tmp_path_factory.getbasetemp() / "reliability-figures.json"


@dataclass
class SharedMesh:
    stack: MeshStack
    digits: DigitsArtifact
    pixels: np.ndarray
    expected: np.ndarray
    admin_key: tuple[str, str]
    infer_key: tuple[str, str]
    """An INFER key scoped to model `digits` only."""

    @property
    def gateway_url(self) -> str:
        assert self.stack.gateway is not None
        return self.stack.gateway.address

    @property
    def worker_url(self) -> str:
        return self.stack.workers[0].address

    def bearer(self, token: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"}


def _store_tinylm(stack: MeshStack) -> registry_pb2.RegisterVersionRequest:
    """A tiny decoupled text model (BYTES in and out) so hostile BYTES reach a real decoder."""
    import torch

    from workers.models import build, save_module_state

    torch.manual_seed(0)
    module = build("tinylm", {"d_model": 32, "n_heads": 2, "n_layers": 1, "context": 32})
    with tempfile.TemporaryDirectory() as tmp:
        path = save_module_state(module, Path(tmp) / "model.pt", arch="tinylm")
        art = stack.store.put_file("chatty", "v1", path, "model.pt")
    sig = common_pb2.Signature(
        inputs=[
            common_pb2.TensorSpec(name="prompt", datatype="BYTES", shape=[1]),
            common_pb2.TensorSpec(name="max_tokens", datatype="INT32", shape=[1], optional=True),
        ],
        outputs=[common_pb2.TensorSpec(name="text", datatype="BYTES", shape=[1])],
        max_batch_size=0,
        decoupled=True,
    )
    return registry_pb2.RegisterVersionRequest(
        model="chatty",
        artifact_uri=art.uri,
        sha256=art.sha256,
        format="module_state",
        signature=sig,
        batching=common_pb2.BatchingConfig(enabled=False),
        dtype="fp32",
    )


async def _serving(url: str, model: str, headers: dict[str, str], pixels: np.ndarray) -> bool:
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        inp = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
        inp.set_data_from_numpy(pixels)
        await client.infer(model, [inp], headers=headers, client_timeout=5.0)
        return True
    finally:
        await client.close()


@pytest.fixture(scope="session")
def shared_mesh(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedMesh]:
    prefix = unique_prefix()
    root = tmp_path_factory.mktemp("shared-mesh")
    # DEBUG everywhere: the auth test checks that no log line at any level carries a token.
    stack = MeshStack(root, redis_url, prefix, log_level="DEBUG")
    digits = make_digits_artifact(stack.store, "digits", "v1")
    chatty = _store_tinylm(stack)
    pixels = np.random.default_rng(1).uniform(0, 16, (3, 64)).astype(np.float32)

    async def setup() -> tuple[tuple[str, str], tuple[str, str]]:
        reg = await Registry.connect(redis_url, prefix)
        try:
            await reg.register_version(register_request("digits", digits.artifact))
            await reg.register_version(chatty)
            admin = await reg.create_api_key("reliability-admin", registry_pb2.ADMIN)
            infer = await reg.create_api_key("reliability-infer", registry_pb2.INFER, models=["digits"])
            return admin, infer
        finally:
            await reg.close()

    admin, infer = asyncio.run(setup())
    mesh = SharedMesh(stack, digits, pixels, digits.reference(pixels), admin, infer)
    try:
        stack.start_router()
        stack.start_worker()
        stack.start_gateway(auth_mode="required")

        async def ready() -> None:
            headers = mesh.bearer(admin[1])
            await async_wait_until(
                lambda: _serving(mesh.gateway_url, "digits", headers, pixels),
                60.0,
                "digits served by the gateway",
            )

        asyncio.run(ready())
        yield mesh
    finally:
        stack.stop_all()
        delete_prefix(redis_url, prefix)
