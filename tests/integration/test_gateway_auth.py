"""Gateway security: API keys (scopes, roles, revocation), rate limits, TLS on the public port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc.aio as aioclient
import trustme
from tritonclient.utils import InferenceServerException

from gateway.app import start_gateway
from mesh.store import ArtifactStore
from mesh.testing import delete_prefix, unique_prefix
from mesh_pb import registry_pb2
from tests.integration.gateway_stack import (
    Artifacts,
    Stack,
    gateway_settings,
    make_artifacts,
    register_digits,
    running_stack,
    wait_routable,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Env:
    stack: Stack
    art: Artifacts
    redis_url: str
    prefix: str
    tmp: Path
    digits: int


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    tmp = tmp_path_factory.mktemp("gateway-auth")
    art = make_artifacts(tmp)
    store = ArtifactStore(tmp / "store")
    prefix = unique_prefix()
    try:
        async with running_stack(
            redis_url, prefix, store, auth_mode="required", auth_cache_ttl_s=0.3, rate_limit_rps=0.0
        ) as stack:
            digits = await register_digits(stack.registry, store, art)
            await register_digits(stack.registry, store, art, model="other")
            await wait_routable(stack.gateway, "digits", digits)
            await wait_routable(stack.gateway, "other", 1)
            yield Env(stack, art, redis_url, prefix, tmp, digits)
    finally:
        delete_prefix(redis_url, prefix)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def digits_input(batch: int = 1) -> aioclient.InferInput:
    inp = aioclient.InferInput("pixels", [batch, 64], "FP32")
    inp.set_data_from_numpy(np.full((batch, 64), 3.0, np.float32))
    return inp


async def status_of(coro: object) -> str:
    with pytest.raises(InferenceServerException) as info:
        await coro  # type: ignore[misc]
    return str(info.value.status())


async def test_keys_scopes_and_roles(env: Env) -> None:
    reg = env.stack.registry
    _, infer_token = await reg.create_api_key("svc", registry_pb2.INFER, ["digits"])
    _, admin_token = await reg.create_api_key("ops", registry_pb2.ADMIN)
    async with aioclient.InferenceServerClient(env.stack.gateway.address) as c:
        assert await status_of(c.infer("digits", [digits_input()])) == "StatusCode.UNAUTHENTICATED"
        wrong = bearer(infer_token.split(".")[0] + ".not-the-secret")
        assert (
            await status_of(c.infer("digits", [digits_input()], headers=wrong))
            == "StatusCode.UNAUTHENTICATED"
        )
        assert await status_of(c.get_model_metadata("digits")) == "StatusCode.UNAUTHENTICATED"

        ok = await c.infer("digits", [digits_input()], headers=bearer(infer_token))
        expected = env.art.digits_reference(np.full((1, 64), 3.0, np.float32))
        np.testing.assert_allclose(ok.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
        status = await status_of(c.infer("other", [digits_input()], headers=bearer(infer_token)))
        assert status == "StatusCode.PERMISSION_DENIED"
        assert (
            await status_of(c.load_model("digits", headers=bearer(infer_token)))
            == "StatusCode.PERMISSION_DENIED"
        )
        assert (
            await status_of(c.unload_model("digits", headers=bearer(infer_token)))
            == "StatusCode.PERMISSION_DENIED"
        )
        index = await c.get_model_repository_index(headers=bearer(infer_token))
        assert {m.name for m in index.models} == {"digits"}

        await c.infer("other", [digits_input()], headers=bearer(admin_token))
        await c.load_model("other", headers=bearer(admin_token))


async def test_revoked_key_stops_within_seconds(env: Env) -> None:
    reg = env.stack.registry
    key_id, token = await reg.create_api_key("temp", registry_pb2.INFER)
    async with aioclient.InferenceServerClient(env.stack.gateway.address) as c:
        await c.infer("digits", [digits_input()], headers=bearer(token))
        await reg.revoke_api_key(key_id)
        for _ in range(100):
            try:
                await c.infer("digits", [digits_input()], headers=bearer(token))
            except InferenceServerException as exc:
                assert exc.status() == "StatusCode.UNAUTHENTICATED"
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("revoked key still accepted after 5 s")


async def test_rate_limit_answers_resource_exhausted(env: Env) -> None:
    _, token = await env.stack.registry.create_api_key("slow", registry_pb2.INFER, rate_limit_rps=3)
    async with aioclient.InferenceServerClient(env.stack.gateway.address) as c:
        outcomes = []
        for _ in range(10):
            try:
                await c.infer("digits", [digits_input()], headers=bearer(token))
                outcomes.append("OK")
            except InferenceServerException as exc:
                outcomes.append(str(exc.status()))
                assert "rate limit" in str(exc.message())
        assert outcomes.count("OK") >= 3
        assert "StatusCode.RESOURCE_EXHAUSTED" in outcomes


async def test_public_address_requires_keys(env: Env) -> None:
    no_registry = gateway_settings(
        env.redis_url, env.prefix, env.stack.router.address, bind="0.0.0.0:0", auth_mode="auto"
    )
    no_registry.redis_url = None
    with pytest.raises(ValueError, match="API keys"):
        await start_gateway(no_registry)
    public = await start_gateway(
        gateway_settings(
            env.redis_url, env.prefix, env.stack.router.address, bind="0.0.0.0:0", auth_mode="auto"
        )
    )
    try:
        async with aioclient.InferenceServerClient(f"127.0.0.1:{public.port}") as c:
            assert await status_of(c.infer("digits", [digits_input()])) == "StatusCode.UNAUTHENTICATED"
    finally:
        await public.stop(0)


async def test_tls_on_the_public_port(env: Env) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = env.tmp / "ca.pem", env.tmp / "gw.pem", env.tmp / "gw.key"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    gw = await start_gateway(
        gateway_settings(
            env.redis_url,
            env.prefix,
            env.stack.router.address,
            auth_mode="optional",
            public_tls_cert_file=cert_file,
            public_tls_key_file=key_file,
        )
    )
    try:
        async with aioclient.InferenceServerClient(gw.address, ssl=True, root_certificates=str(ca_file)) as c:
            result = await c.infer("digits", [digits_input(2)])
            assert result.as_numpy("logits").shape == (2, 10)
        async with aioclient.InferenceServerClient(gw.address) as plain:
            with pytest.raises(InferenceServerException):
                await plain.infer("digits", [digits_input()], client_timeout=2)
    finally:
        await gw.stop(0)
