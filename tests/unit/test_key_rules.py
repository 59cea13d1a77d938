"""Which router RPCs need which key, and what each auth_mode means on an address."""

from __future__ import annotations

import pytest

from mesh.auth import ApiKeyInterceptor, Authenticator, bearer_metadata, keys_required
from mesh_pb import registry_pb2, router_pb2
from router.app import KEY_RULES


@pytest.mark.parametrize(
    ("mode", "bind", "expected"),
    [
        ("auto", "127.0.0.1:8101", False),
        ("auto", "localhost:8101", False),
        ("auto", "[::1]:8101", False),
        ("auto", "0.0.0.0:8101", True),
        ("auto", "router:8101", True),
        ("required", "127.0.0.1:0", True),
        ("optional", "0.0.0.0:0", False),
        ("disabled", "0.0.0.0:0", None),
    ],
)
def test_keys_required(mode: str, bind: str, expected: bool | None) -> None:
    assert keys_required(mode, bind) is expected


def test_router_rules_cover_every_rpc() -> None:
    rules = ApiKeyInterceptor(Authenticator(None, required=False), KEY_RULES)
    for module, name in ((registry_pb2, "RegistryService"), (router_pb2, "RouterService")):
        service = module.DESCRIPTOR.services_by_name[name]
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            assert rules.need(path) == ("any" if method.name == "WatchRoutes" else "admin"), path
    assert rules.need("/grpc.health.v1.Health/Check") is None
    assert rules.need("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None


def test_bearer_metadata() -> None:
    assert bearer_metadata(None) == () and bearer_metadata("") == ()
    assert bearer_metadata("abc") == (("authorization", "Bearer abc"),)
