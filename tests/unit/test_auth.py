"""API-key authentication: header parsing, scopes, roles, TTL cache, revocation and registry outages."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from gateway.auth import ANONYMOUS, Authenticator, principal_from_key, token_from_metadata
from mesh.errors import PermissionDenied, Unauthenticated, Unavailable
from mesh_pb import registry_pb2


@dataclass
class Key:
    key_id: str
    name: str
    role: int
    models: list[str] = field(default_factory=list)
    rate_limit_rps: float = 0.0
    revoked: bool = False


class KeyTable:
    """An in-memory key table with the registry's verify_api_key signature (counts lookups)."""

    def __init__(self) -> None:
        self.keys: dict[str, Key] = {}
        self.lookups = 0
        self.down = False

    async def verify_api_key(self, token: str) -> Key | None:
        self.lookups += 1
        await asyncio.sleep(0)
        if self.down:
            raise ConnectionError("registry down")
        return self.keys.get(token)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_token_from_metadata() -> None:
    assert token_from_metadata(None) is None
    assert token_from_metadata((("x-request-id", "1"),)) is None
    assert token_from_metadata(bearer("abc.def")) == "abc.def"
    assert token_from_metadata((("authorization", "bearer  tok "),)) == "tok"
    with pytest.raises(Unauthenticated, match="authorization"):
        token_from_metadata((("authorization", "Basic dXNlcjpwdw=="),))
    with pytest.raises(Unauthenticated, match="empty"):
        token_from_metadata((("authorization", "Bearer "),))


def test_principal_scopes_and_roles() -> None:
    infer = principal_from_key(Key("k1", "svc", registry_pb2.INFER, ["digits"]))
    admin = principal_from_key(Key("k2", "ops", registry_pb2.ADMIN))
    assert not infer.admin and admin.admin
    infer.check_model("digits")
    with pytest.raises(PermissionDenied, match="model_name"):
        infer.check_model("encoder")
    with pytest.raises(PermissionDenied, match="admin"):
        infer.check_admin("RepositoryModelLoad")
    admin.check_model("anything")
    admin.check_admin("RepositoryModelLoad")
    assert principal_from_key(Key("k3", "x", 0)).admin is False


async def test_required_and_optional_modes() -> None:
    table = KeyTable()
    table.keys["good"] = Key("k1", "svc", registry_pb2.INFER)
    required = Authenticator(table, required=True)
    with pytest.raises(Unauthenticated, match="missing"):
        await required.authenticate(())
    with pytest.raises(Unauthenticated, match="invalid"):
        await required.authenticate(bearer("wrong"))
    assert (await required.authenticate(bearer("good"))).key_id == "k1"

    optional = Authenticator(table, required=False)
    assert await optional.authenticate(()) is ANONYMOUS
    with pytest.raises(Unauthenticated):
        await optional.authenticate(bearer("wrong"))
    with pytest.raises(ValueError):
        Authenticator(None, required=True)


async def test_cache_hits_and_revocation_within_ttl() -> None:
    table = KeyTable()
    table.keys["good"] = Key("k1", "svc", registry_pb2.ADMIN)
    clock = Clock()
    auth = Authenticator(table, required=True, ttl_s=2.0, clock=clock)
    for _ in range(50):
        await auth.authenticate(bearer("good"))
    assert table.lookups == 1
    # Concurrent first lookups of another token share one registry call.
    table.keys["other"] = Key("k2", "svc", registry_pb2.INFER)
    await asyncio.gather(*(auth.authenticate(bearer("other")) for _ in range(10)))
    assert table.lookups == 2
    table.keys["good"].revoked = True
    await auth.authenticate(bearer("good"))  # still cached
    clock.now += 2.5
    with pytest.raises(Unauthenticated):
        await auth.authenticate(bearer("good"))
    # Negative answers are cached too.
    lookups = table.lookups
    for _ in range(5):
        with pytest.raises(Unauthenticated):
            await auth.authenticate(bearer("nope"))
    assert table.lookups == lookups + 1


async def test_registry_outage_uses_recent_verdicts() -> None:
    table = KeyTable()
    table.keys["good"] = Key("k1", "svc", registry_pb2.INFER)
    clock = Clock()
    auth = Authenticator(table, required=True, ttl_s=1.0, stale_s=60.0, clock=clock)
    await auth.authenticate(bearer("good"))
    table.down = True
    clock.now += 5
    assert (await auth.authenticate(bearer("good"))).key_id == "k1"
    with pytest.raises(Unavailable, match="authorization"):
        await auth.authenticate(bearer("never-seen"))
    clock.now += 120
    with pytest.raises(Unavailable):
        await auth.authenticate(bearer("good"))
