"""API keys on the router: registry admin API and Place need the admin role, WatchRoutes any valid key."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest
import tritonclient.grpc.aio as aioclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from gateway.app import start_gateway
from mesh.auth import bearer_metadata
from mesh.registry import Registry
from mesh_pb import common_pb2, registry_pb2, registry_pb2_grpc, router_pb2, router_pb2_grpc
from router.app import RouterApp, start_router
from tests.integration.gateway_stack import gateway_settings, router_settings, wait_until

SHA = "ab" * 32


async def _code(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value.code(), err.value.details() or ""


async def _first(stream: Any) -> Any:
    async for item in stream:
        stream.cancel()
        return item
    raise AssertionError("stream ended without a message")


def _local(router: RouterApp) -> str:
    return f"127.0.0.1:{router.port}"


async def _keys(registry: Registry) -> tuple[str, str]:
    _, admin = await registry.create_api_key("ops", registry_pb2.ADMIN)
    _, infer = await registry.create_api_key("svc", registry_pb2.INFER)
    return admin, infer


async def _register(registry: Registry, model: str = "digits") -> None:
    await registry.register_version(
        registry_pb2.RegisterVersionRequest(
            model=model,
            artifact_uri=f"store://{model}/1/model.pt2",
            sha256=SHA,
            format="torch_export",
            signature=common_pb2.Signature(
                inputs=[common_pb2.TensorSpec(name="x", datatype="FP32", shape=[-1, 4])],
                outputs=[common_pb2.TensorSpec(name="y", datatype="FP32", shape=[-1, 2])],
            ),
        )
    )


@pytest.fixture
def start(redis_url: str, prefix: str) -> Callable[..., Awaitable[RouterApp]]:
    return lambda **kw: start_router(router_settings(redis_url, prefix, placement=False, **kw))


@pytest.fixture
async def required(start: Callable[..., Awaitable[RouterApp]]) -> AsyncIterator[RouterApp]:
    app = await start(auth_mode="required")
    try:
        yield app
    finally:
        await app.stop(0)


# Every admin RPC of both services, as (label, call(registry stub, router stub, metadata)).
ADMIN_CALLS: list[tuple[str, Callable[[Any, Any, Any], Awaitable[Any]]]] = [
    ("ListModels", lambda reg, _r, md: reg.ListModels(registry_pb2.ListModelsRequest(), metadata=md)),
    ("GetVersion", lambda reg, _r, md: reg.GetVersion(common_pb2.ModelRef(name="x", version=1), metadata=md)),
    (
        "CreateApiKey",
        lambda reg, _r, md: reg.CreateApiKey(
            registry_pb2.CreateApiKeyRequest(name="minted", role=registry_pb2.ADMIN), metadata=md
        ),
    ),
    (
        "RevokeApiKey",
        lambda reg, _r, md: reg.RevokeApiKey(registry_pb2.RevokeApiKeyRequest(key_id="k"), metadata=md),
    ),
    (
        "SetAlias",
        lambda reg, _r, md: reg.SetAlias(registry_pb2.SetAliasRequest(model="x", alias="a"), metadata=md),
    ),
    (
        "WatchEvents",
        lambda reg, _r, md: _first(
            reg.WatchEvents(registry_pb2.WatchEventsRequest(after_id="0"), metadata=md)
        ),
    ),
    (
        "Place",
        lambda _g, rt, md: rt.Place(router_pb2.PlaceRequest(ref=common_pb2.ModelRef(name="x")), metadata=md),
    ),
]


async def test_required_keys_on_admin_rpcs(required: RouterApp, registry: Registry) -> None:
    admin, infer = await _keys(registry)
    async with grpc.aio.insecure_channel(_local(required)) as channel:
        reg = registry_pb2_grpc.RegistryServiceStub(channel)
        rt = router_pb2_grpc.RouterServiceStub(channel)
        for label, call in ADMIN_CALLS:
            code, details = await _code(call(reg, rt, None))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "missing API key" in details, label
            code, details = await _code(call(reg, rt, bearer_metadata(infer)))
            assert code == grpc.StatusCode.PERMISSION_DENIED, label
            assert "admin role" in details and label in details, label
            code, details = await _code(call(reg, rt, bearer_metadata("not-a-key")))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "invalid" in details, label
        code, _ = await _code(
            reg.ListModels(registry_pb2.ListModelsRequest(), metadata=(("authorization", "Basic x"),))
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED
        # The admin key passes: the calls reach the registry and the router's placement.
        md = bearer_metadata(admin)
        await _register(registry)
        listed = await reg.ListModels(registry_pb2.ListModelsRequest(), metadata=md)
        assert [m.name for m in listed.models] == ["digits"]
        minted = await reg.CreateApiKey(registry_pb2.CreateApiKeyRequest(name="new"), metadata=md)
        assert (await registry.verify_api_key(minted.token)) is not None
        event = await _first(reg.WatchEvents(registry_pb2.WatchEventsRequest(after_id="0"), metadata=md))
        assert event.kind == "api_key"  # _keys created the first events
        code, _ = await _code(
            rt.Place(router_pb2.PlaceRequest(ref=common_pb2.ModelRef(name="nope")), metadata=md)
        )
        assert code == grpc.StatusCode.NOT_FOUND
        # Health stays open for orchestrators' probes.
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_watch_routes_takes_any_valid_key(required: RouterApp, registry: Registry) -> None:
    admin, infer = await _keys(registry)
    async with grpc.aio.insecure_channel(_local(required)) as channel:
        rt = router_pb2_grpc.RouterServiceStub(channel)
        request = router_pb2.WatchRoutesRequest(subscriber="test")
        code, _ = await _code(_first(rt.WatchRoutes(request)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = await _code(_first(rt.WatchRoutes(request, metadata=bearer_metadata("wrong"))))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        for token in (infer, admin):
            table = await _first(rt.WatchRoutes(request, metadata=bearer_metadata(token)))
            assert isinstance(table, router_pb2.RouteTable)


async def test_gateway_follows_a_router_requiring_keys(
    required: RouterApp, registry: Registry, redis_url: str, prefix: str
) -> None:
    admin, infer = await _keys(registry)
    await _register(registry)
    await required.refresh()
    address = _local(required)
    # No key configured: the router refuses the route stream, the gateway has no table.
    blind = await start_gateway(gateway_settings(redis_url, prefix, address, startup_table_timeout_s=0.5))
    try:
        assert blind.watcher.tables_received == 0 and not blind.watcher.connected
    finally:
        await blind.stop(0)
    # An infer key follows the table; RepositoryModelLoad (the router's Place) needs an admin key.
    for token, load_code in ((infer, "PERMISSION_DENIED"), (admin, "UNAVAILABLE")):
        gw = await start_gateway(gateway_settings(redis_url, prefix, address, router_api_key=token))
        try:
            await wait_until(lambda gw=gw: gw.watcher.tables_received > 0, 10.0, "a route table")
            assert any(m.model == "digits" for m in gw.picker.table.models)
            async with aioclient.InferenceServerClient(gw.address) as client:
                with pytest.raises(InferenceServerException) as err:
                    await client.load_model("digits")
            # PERMISSION_DENIED comes from the router; UNAVAILABLE means placement ran (no worker here).
            assert str(err.value.status()) == f"StatusCode.{load_code}", err.value.message()
        finally:
            await gw.stop(0)


async def test_loopback_default_keys_optional(
    start: Callable[..., Awaitable[RouterApp]], registry: Registry
) -> None:
    app = await start()  # auth_mode "auto" on 127.0.0.1: keys optional
    admin, infer = await _keys(registry)
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            reg = registry_pb2_grpc.RegistryServiceStub(channel)
            rt = router_pb2_grpc.RouterServiceStub(channel)
            await reg.ListModels(registry_pb2.ListModelsRequest())
            await reg.CreateApiKey(registry_pb2.CreateApiKeyRequest(name="anon-minted"))
            await _first(rt.WatchRoutes(router_pb2.WatchRoutesRequest(subscriber="test")))
            await reg.ListModels(registry_pb2.ListModelsRequest(), metadata=bearer_metadata(admin))
            # A key that is sent must still be valid, and its role still counts.
            code, details = await _code(
                reg.ListModels(registry_pb2.ListModelsRequest(), metadata=bearer_metadata("wrong"))
            )
            assert code == grpc.StatusCode.UNAUTHENTICATED and "invalid" in details
            code, _ = await _code(
                reg.ListModels(registry_pb2.ListModelsRequest(), metadata=bearer_metadata(infer))
            )
            assert code == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await app.stop(0)


async def test_auto_requires_keys_off_loopback_and_disabled_checks_nothing(
    start: Callable[..., Awaitable[RouterApp]], registry: Registry
) -> None:
    public = await start(bind="0.0.0.0:0")
    try:
        async with grpc.aio.insecure_channel(_local(public)) as channel:
            code, _ = await _code(
                registry_pb2_grpc.RegistryServiceStub(channel).ListModels(registry_pb2.ListModelsRequest())
            )
            assert code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await public.stop(0)
    off = await start(auth_mode="disabled")
    try:
        async with grpc.aio.insecure_channel(off.address) as channel:
            await registry_pb2_grpc.RegistryServiceStub(channel).ListModels(
                registry_pb2.ListModelsRequest(), metadata=bearer_metadata("wrong")
            )
    finally:
        await off.stop(0)
