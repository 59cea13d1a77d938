"""The registry client: models, versions, aliases, traffic, workers, API keys and the event stream.

This module is the only place that knows the Redis key schema (class Keys). Writes are atomic (Lua or
WATCH/MULTI) and every change is appended to one Redis stream, so watchers resume without losses.
Works on Redis >= 6.2 and Valkey.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from mesh.errors import (
    FailedPrecondition,
    InvalidArgument,
    InvalidVersion,
    ModelNotFound,
    NotFound,
    VersionNotFound,
)
from mesh.versions import version_number
from mesh_pb import common_pb2, registry_pb2, worker_pb2

log = logging.getLogger(__name__)

VS = common_pb2.VersionState
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")
_DATATYPES = {
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "BF16", "FP32", "FP64", "BYTES",
}  # fmt: skip
FORMATS = {"torch_export", "torchscript", "onnx", "module_state"}
DTYPES = {"", "fp32", "fp16", "bf16"}
EVENTS_MAXLEN = 100_000

# Legal moves of the version state machine; staying in the same state is always allowed.
TRANSITIONS: dict[int, set[int]] = {
    VS.REGISTERED: {VS.LOADING, VS.READY, VS.FAILED, VS.REJECTED, VS.RETIRED},
    VS.LOADING: {VS.READY, VS.FAILED, VS.REGISTERED, VS.RETIRED},
    VS.READY: {VS.RETIRED, VS.FAILED},
    VS.FAILED: {VS.RETIRED},
    VS.REJECTED: {VS.RETIRED},
    VS.RETIRED: set(),
}
INITIAL_STATES = {VS.REGISTERED, VS.READY, VS.REJECTED}
# The alias that requests naming no version (and no traffic split) go to.
STABLE_ALIAS = "stable"


def state_name(state: int) -> str:
    return common_pb2.VersionState.Name(state)  # type: ignore[arg-type]


class Keys:
    """The Redis key schema, in one place."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.models = f"{prefix}:models"
        self.events = f"{prefix}:events"
        self.workers = f"{prefix}:workers"
        self.api_keys = f"{prefix}:apikeys"
        # Compression jobs: a stream consumed by a group of compressors, a record per job, an index.
        self.jobs_stream = f"{prefix}:jobs:stream"
        self.jobs_group = "compressors"
        self.jobs_index = f"{prefix}:jobs:index"

    def model(self, name: str) -> str:
        return f"{self.prefix}:model:{name}"

    def versions(self, name: str) -> str:
        return f"{self.prefix}:model:{name}:versions"

    def aliases(self, name: str) -> str:
        return f"{self.prefix}:model:{name}:aliases"

    def idempotency(self, name: str) -> str:
        return f"{self.prefix}:model:{name}:idem"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    def api_key(self, key_id: str) -> str:
        return f"{self.prefix}:apikey:{key_id}"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def job_lock(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:lock"


@dataclass
class ApiKey:
    key_id: str
    name: str
    role: int
    models: list[str] = field(default_factory=list)
    rate_limit_rps: float = 0.0
    revoked: bool = False
    created_ms: int = 0

    def allows_model(self, model: str) -> bool:
        return not self.models or model in self.models

    @property
    def is_admin(self) -> bool:
        return self.role == registry_pb2.ADMIN


# Registration in one step: next id, record, idempotency key, model index, event.
_REGISTER_LUA = """
if ARGV[3] ~= '' then
  local existing = redis.call('HGET', KEYS[3], ARGV[3])
  if existing then return {tonumber(existing), 0} end
end
local n = redis.call('HINCRBY', KEYS[1], 'next_version', 1)
redis.call('HSET', KEYS[2], tostring(n), ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[3], ARGV[3], tostring(n)) end
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('HSETNX', KEYS[1], 'created_ms', ARGV[4])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*', 'kind', 'version_registered',
  'model', ARGV[1], 'version', tostring(n), 'state', ARGV[5])
return {n, 1}
"""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _check_name(value: str, field_name: str) -> None:
    if not _NAME.match(value or ""):
        raise InvalidArgument(
            f"{field_name}: {value!r} is not a valid name (letters, digits, '.', '_', '-'; at most 128)"
        )


def validate_artifact(format: str, dtype: str, signature: common_pb2.Signature) -> None:
    """What register_version requires of a version's artifact description: a known format and dtype,
    a valid signature (the CLI checks it before copying an upload into the store)."""
    if format not in FORMATS:
        raise InvalidArgument(f"format: {format!r} is not one of {sorted(FORMATS)}")
    if dtype not in DTYPES:
        raise InvalidArgument(f"dtype: {dtype!r} is not one of fp32, fp16, bf16")
    validate_signature(signature)


def validate_signature(sig: common_pb2.Signature, field_name: str = "signature") -> None:
    """Refuses signatures a worker could not serve; the message names the offending field."""
    if not sig.inputs:
        raise InvalidArgument(f"{field_name}.inputs: at least one input is required")
    if not sig.outputs:
        raise InvalidArgument(f"{field_name}.outputs: at least one output is required")
    if sig.max_batch_size < 0:
        raise InvalidArgument(f"{field_name}.max_batch_size: must be >= 0, got {sig.max_batch_size}")
    for kind, tensors in (("inputs", sig.inputs), ("outputs", sig.outputs)):
        seen: set[str] = set()
        for i, t in enumerate(tensors):
            where = f"{field_name}.{kind}[{i}]"
            if not t.name:
                raise InvalidArgument(f"{where}.name: must not be empty")
            if t.name in seen:
                raise InvalidArgument(f"{where}.name: duplicate tensor name {t.name!r}")
            seen.add(t.name)
            if t.datatype not in _DATATYPES:
                raise InvalidArgument(f"{where}.datatype: unknown datatype {t.datatype!r}")
            if not t.shape:
                raise InvalidArgument(f"{where}.shape: must have at least one dimension")
            for d in t.shape:
                if d < -1 or d == 0:
                    raise InvalidArgument(f"{where}.shape: dimension {d} is invalid (use -1 for variable)")
            if sig.max_batch_size > 0 and t.shape[0] != -1:
                raise InvalidArgument(f"{where}.shape: the first dimension of a batching model must be -1")


def _weights(
    traffic: Iterable[tuple[int, float]] | Sequence[common_pb2.TrafficWeight],
) -> list[tuple[int, float]]:
    out: list[tuple[int, float]] = []
    for item in traffic:
        if isinstance(item, common_pb2.TrafficWeight):
            out.append((int(item.version), float(item.weight)))
        else:
            version, weight = item
            out.append((int(version), float(weight)))
    return out


def _event_from_fields(event_id: bytes | str, fields: dict[Any, Any]) -> registry_pb2.RegistryEvent:
    decoded = {
        (k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
        for k, v in fields.items()
    }
    kind = decoded.pop("kind", "")
    model = decoded.pop("model", "")
    version = int(decoded.pop("version", "0") or 0)
    return registry_pb2.RegistryEvent(
        id=event_id.decode() if isinstance(event_id, bytes) else str(event_id),
        kind=kind,
        model=model,
        version=version,
        fields=decoded,
    )


class Registry:
    """Async registry client over one redis.asyncio connection pool."""

    def __init__(self, client: aioredis.Redis, prefix: str = "maas") -> None:
        # Typed as Any: redis-py's annotations model decode_responses both ways; ours is always bytes.
        self.redis: Any = client
        self.keys = Keys(prefix)
        self._register = client.register_script(_REGISTER_LUA)

    @classmethod
    async def connect(cls, url: str, prefix: str = "maas", **kwargs: Any) -> Registry:
        client = aioredis.Redis.from_url(url, **kwargs)
        await client.ping()
        return cls(client, prefix)

    async def close(self) -> None:
        await self.redis.aclose()

    # ------------------------------------------------------------------ events
    async def _event(self, kind: str, model: str = "", version: int = 0, **fields: Any) -> str:
        payload: dict[str, Any] = {"kind": kind, "model": model, "version": str(version)}
        payload.update({k: str(v) for k, v in fields.items()})
        event_id = await self.redis.xadd(self.keys.events, payload, maxlen=EVENTS_MAXLEN, approximate=True)
        return event_id.decode() if isinstance(event_id, bytes) else str(event_id)

    async def last_event_id(self) -> str:
        """Id of the newest event ("0-0" when none): read it, then watch from it to miss nothing."""
        entries = await self.redis.xrevrange(self.keys.events, count=1)
        if not entries:
            return "0-0"
        eid = entries[0][0]
        return eid.decode() if isinstance(eid, bytes) else str(eid)

    async def read_events(
        self, after_id: str = "0", count: int = 100, block_ms: int | None = 0
    ) -> list[registry_pb2.RegistryEvent]:
        """Events after after_id ("0" = from the start, "$" = only new ones), oldest first."""
        block = block_ms if block_ms else None
        result = await self.redis.xread({self.keys.events: after_id}, count=count, block=block)
        events: list[registry_pb2.RegistryEvent] = []
        for _stream, entries in result or []:
            for event_id, fields in entries:
                events.append(_event_from_fields(event_id, fields))
        return events

    async def watch_events(
        self, after_id: str = "$", block_ms: int = 1000, retry_s: float = 0.5
    ) -> AsyncIterator[registry_pb2.RegistryEvent]:
        """Yields events forever; after a dropped connection it resumes after the last id it yielded."""
        last = after_id
        if last == "$":
            last = await self.last_event_id()
        while True:
            try:
                events = await self.read_events(last, count=500, block_ms=block_ms)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("registry event stream interrupted (%s); resuming after %s", exc, last)
                await asyncio.sleep(retry_s)
                continue
            for event in events:
                last = event.id
                yield event

    # ------------------------------------------------------------------ versions
    async def register_version(self, req: registry_pb2.RegisterVersionRequest) -> common_pb2.ModelVersion:
        """Records a version under the model's next integer id (atomic; idempotent by idempotency_key)."""
        _check_name(req.model, "model")
        if not req.artifact_uri:
            raise InvalidArgument("artifact_uri: must not be empty")
        if not re.fullmatch(r"[0-9a-f]{64}", req.sha256):
            raise InvalidArgument(f"sha256: {req.sha256!r} is not 64 lowercase hex digits")
        validate_artifact(req.format, req.dtype, req.signature)
        state = req.state or VS.REGISTERED
        if state not in INITIAL_STATES:
            raise InvalidArgument(f"state: a version cannot be registered as {state_name(state)}")
        if req.min_replicas < 0 or req.max_replicas < 0:
            raise InvalidArgument("min_replicas: replica counts must be >= 0")
        if req.max_replicas and req.min_replicas > req.max_replicas:
            raise InvalidArgument("min_replicas: must not exceed max_replicas")
        if req.lineage.parent_version:
            await self.get_version(req.model, req.lineage.parent_version)
        record = common_pb2.ModelVersion(
            ref=common_pb2.ModelRef(name=req.model, version=0),
            state=state,
            artifact_uri=req.artifact_uri,
            sha256=req.sha256,
            format=req.format,
            signature=req.signature,
            batching=req.batching,
            dtype=req.dtype or "fp32",
            lineage=req.lineage,
            created_ms=_now_ms(),
            reason=req.reason,
            size_bytes=req.size_bytes,
            min_replicas=req.min_replicas or 1,
            max_replicas=req.max_replicas,
            labels=req.labels,
        )
        k = self.keys
        result = await self._register(
            keys=[k.model(req.model), k.versions(req.model), k.idempotency(req.model), k.models, k.events],
            args=[
                req.model,
                record.SerializeToString(),
                req.idempotency_key,
                str(record.created_ms),
                state_name(state),
                str(EVENTS_MAXLEN),
            ],
        )
        version = int(result[0])
        return await self.get_version(req.model, version)

    def _decode_version(self, model: str, version: int, raw: bytes) -> common_pb2.ModelVersion:
        mv = common_pb2.ModelVersion()
        mv.ParseFromString(raw)
        # The hash field is the source of truth for the id (records are written before it is known).
        mv.ref.name = model
        mv.ref.version = version
        return mv

    async def get_version(self, model: str, version: int) -> common_pb2.ModelVersion:
        raw = await self.redis.hget(self.keys.versions(model), str(int(version)))
        if raw is None:
            if not await self.redis.sismember(self.keys.models, model):
                raise ModelNotFound(model)
            raise VersionNotFound(model, version)
        return self._decode_version(model, int(version), raw)

    async def list_versions(self, model: str) -> list[common_pb2.ModelVersion]:
        raw = await self.redis.hgetall(self.keys.versions(model))
        if not raw and not await self.redis.sismember(self.keys.models, model):
            raise ModelNotFound(model)
        out = [self._decode_version(model, int(k), v) for k, v in raw.items()]
        return sorted(out, key=lambda mv: mv.ref.version)

    async def _update_version(
        self,
        model: str,
        version: int,
        mutate: Callable[[common_pb2.ModelVersion], Awaitable[dict[str, Any] | None] | dict[str, Any] | None],
        event_kind: str,
    ) -> common_pb2.ModelVersion:
        key = self.keys.versions(model)
        field_name = str(int(version))
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.hget(key, field_name)
                    if raw is None:
                        await pipe.unwatch()
                        await self.get_version(model, version)  # raises the precise NotFound
                    mv = self._decode_version(model, int(version), cast(bytes, raw))
                    fields = mutate(mv)
                    if asyncio.iscoroutine(fields):
                        fields = await fields
                    if fields is None:  # nothing changed
                        await pipe.unwatch()
                        return mv
                    pipe.multi()
                    pipe.hset(key, field_name, mv.SerializeToString())
                    payload = {"kind": event_kind, "model": model, "version": field_name}
                    payload.update({k: str(v) for k, v in cast(dict, fields).items()})
                    pipe.xadd(self.keys.events, payload, maxlen=EVENTS_MAXLEN, approximate=True)
                    await pipe.execute()
                    return mv
                except WatchError:
                    continue

    async def set_state(
        self, model: str, version: int, state: int, reason: str = "", *, force: bool = False
    ) -> common_pb2.ModelVersion:
        """Moves a version along the state machine; an illegal move is FailedPrecondition.

        Retiring the version that serves the model's requests is FailedPrecondition too unless `force`
        (see _check_retire): retired is terminal, and a slip would leave the model unservable."""
        if state not in TRANSITIONS:
            raise InvalidArgument(f"state: unknown version state {state}")

        async def mutate(mv: common_pb2.ModelVersion) -> dict[str, Any] | None:
            if state == VS.RETIRED and mv.state == VS.READY and not force:
                await self._check_retire(model, version)
            if mv.state == state:
                if reason and mv.reason != reason:
                    mv.reason = reason
                    return {"state": state_name(state), "reason": reason}
                return None
            if state not in TRANSITIONS[mv.state]:
                raise FailedPrecondition(
                    f"state: version {model}:{version} cannot move from {state_name(mv.state)} to {state_name(state)}"
                )
            previous = mv.state
            mv.state = state  # type: ignore[assignment]
            mv.reason = reason
            return {"state": state_name(state), "previous": state_name(previous), "reason": reason}

        mv = await self._update_version(model, version, mutate, "version_state")
        if state in (VS.RETIRED, VS.FAILED, VS.REJECTED):
            await self._drop_references(model, version)
        return mv

    async def _check_retire(self, model: str, version: int) -> None:
        """Refuses to retire a READY version that requests still go to: the target of the `stable` alias,
        or the model's last READY version while a traffic split is set. Runs inside set_state's WATCH on
        the versions, so a version changing state meanwhile makes the write retry with a fresh check (an
        alias moved at the same instant is not watched: this guards against a slip, it is no lock)."""
        how = f"or retire it with force (maas models retire {model} {version} --force)"
        if (await self.get_aliases(model)).get(STABLE_ALIAS) == version:
            raise FailedPrecondition(
                f"version: {model}:{version} is the model's '{STABLE_ALIAS}' version; point "
                f"'{STABLE_ALIAS}' at another READY version first (maas models alias {model} "
                f"{STABLE_ALIAS} VERSION), {how}"
            )
        if not await self.get_traffic(model):
            return
        ready = [mv.ref.version for mv in await self.list_versions(model) if mv.state == VS.READY]
        if ready == [version]:
            raise FailedPrecondition(
                f"version: {model}:{version} is the model's last READY version and its traffic split "
                f"sends requests to it; clear the split first (maas models traffic {model}), {how}"
            )

    async def update_version(self, mv: common_pb2.ModelVersion) -> common_pb2.ModelVersion:
        """Replaces a version's lineage, labels, replicas and reason (not its identity or state)."""

        def mutate(current: common_pb2.ModelVersion) -> dict[str, Any]:
            current.lineage.CopyFrom(mv.lineage)
            current.labels.clear()
            current.labels.update(mv.labels)
            current.reason = mv.reason
            if mv.min_replicas:
                current.min_replicas = mv.min_replicas
            current.max_replicas = mv.max_replicas
            return {}

        return await self._update_version(mv.ref.name, mv.ref.version, mutate, "version_updated")

    async def _drop_references(self, model: str, version: int) -> None:
        """A version leaving service loses its aliases and its traffic share."""
        aliases = await self.redis.hgetall(self.keys.aliases(model))
        for alias, target in aliases.items():
            if int(target) == version:
                await self.redis.hdel(self.keys.aliases(model), alias)
                await self._event("alias", model, 0, alias=alias.decode(), removed="1")
        traffic = await self.get_traffic(model)
        if any(v == version for v, _ in traffic):
            remaining = [(v, w) for v, w in traffic if v != version]
            await self.redis.hset(self.keys.model(model), "traffic", json.dumps(remaining))
            await self._event("traffic", model, 0, weights=json.dumps(remaining))

    # ------------------------------------------------------------------ models
    async def _require_model(self, model: str) -> None:
        if not await self.redis.sismember(self.keys.models, model):
            raise ModelNotFound(model)

    async def get_traffic(self, model: str) -> list[tuple[int, float]]:
        raw = await self.redis.hget(self.keys.model(model), "traffic")
        return [(int(v), float(w)) for v, w in json.loads(raw)] if raw else []

    async def get_aliases(self, model: str) -> dict[str, int]:
        raw = await self.redis.hgetall(self.keys.aliases(model))
        return {k.decode(): int(v) for k, v in raw.items()}

    async def get_model(self, name: str, include_versions: bool = True) -> common_pb2.Model:
        await self._require_model(name)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.model(name))
            pipe.hgetall(self.keys.aliases(name))
            pipe.hgetall(self.keys.versions(name)) if include_versions else pipe.echo(b"")
            meta, aliases, versions = await pipe.execute()
        model = common_pb2.Model(
            name=name,
            created_ms=int(meta.get(b"created_ms", 0) or 0),
            description=(meta.get(b"description") or b"").decode(),
        )
        for alias, version in aliases.items():
            model.aliases[alias.decode()] = int(version)
        for version, weight in json.loads(meta[b"traffic"]) if meta.get(b"traffic") else []:
            model.traffic.add(version=int(version), weight=float(weight))
        if include_versions:
            decoded = [self._decode_version(name, int(k), v) for k, v in versions.items()]
            model.versions.extend(sorted(decoded, key=lambda mv: mv.ref.version))
        return model

    async def list_models(self, include_versions: bool = False) -> list[common_pb2.Model]:
        names = sorted(n.decode() for n in await self.redis.smembers(self.keys.models))
        models = []
        for name in names:
            try:
                models.append(await self.get_model(name, include_versions))
            except ModelNotFound:
                continue
        return models

    async def set_alias(self, model: str, alias: str, version: int) -> common_pb2.Model:
        """Points an alias at a READY version; version 0 removes the alias."""
        if not _ALIAS.match(alias or ""):
            raise InvalidArgument(f"alias: {alias!r} is not a valid alias name (a letter first, at most 64)")
        if alias.isdigit():
            raise InvalidArgument("alias: must not be a number (numbers name versions)")
        await self._require_model(model)
        if version == 0:
            removed = await self.redis.hdel(self.keys.aliases(model), alias)
            if not removed:
                raise NotFound(f"alias: model '{model}' has no alias {alias!r}")
            await self._event("alias", model, 0, alias=alias, removed="1")
            return await self.get_model(model, include_versions=False)
        mv = await self.get_version(model, version)
        if mv.state != VS.READY:
            raise FailedPrecondition(
                f"version: alias {alias!r} can only point at a READY version; {model}:{version} is {state_name(mv.state)}"
            )
        await self.redis.hset(self.keys.aliases(model), alias, str(version))
        await self._event("alias", model, version, alias=alias)
        return await self.get_model(model, include_versions=False)

    async def set_traffic(
        self, model: str, traffic: Iterable[tuple[int, float]] | Sequence[common_pb2.TrafficWeight]
    ) -> common_pb2.Model:
        """Replaces the split for requests that name no version; an empty list clears it."""
        await self._require_model(model)
        weights = _weights(traffic)
        seen: set[int] = set()
        for i, (version, weight) in enumerate(weights):
            if not weight >= 0 or weight != weight or weight == float("inf"):
                raise InvalidArgument(f"traffic[{i}].weight: must be a finite number >= 0, got {weight}")
            if version in seen:
                raise InvalidArgument(f"traffic[{i}].version: version {version} appears twice")
            seen.add(version)
            mv = await self.get_version(model, version)
            if mv.state != VS.READY:
                raise FailedPrecondition(
                    f"traffic[{i}].version: {model}:{version} is {state_name(mv.state)}, not READY"
                )
        if weights and sum(w for _, w in weights) <= 0:
            raise InvalidArgument("traffic: the weights must not all be zero")
        await self.redis.hset(self.keys.model(model), "traffic", json.dumps(weights))
        await self._event("traffic", model, 0, weights=json.dumps(weights))
        return await self.get_model(model, include_versions=False)

    async def resolve(self, model: str, version: str = "") -> int:
        """A version id from "" (heaviest traffic leg, else stable, else latest READY), "3" or an alias."""
        await self._require_model(model)
        number = version_number(version)
        if number is not None:
            await self.get_version(model, number)
            return number
        aliases = await self.get_aliases(model)
        if version:
            if version not in aliases:
                raise InvalidVersion(model, version)
            return aliases[version]
        traffic = [(v, w) for v, w in await self.get_traffic(model) if w > 0]
        if traffic:
            return max(traffic, key=lambda vw: vw[1])[0]
        if STABLE_ALIAS in aliases:
            return aliases[STABLE_ALIAS]
        ready = [mv.ref.version for mv in await self.list_versions(model) if mv.state == VS.READY]
        if not ready:
            raise VersionNotFound(model, "latest READY")
        return max(ready)

    # ------------------------------------------------------------------ workers
    async def heartbeat(self, stats: worker_pb2.WorkerStats, ttl_s: float) -> None:
        """Publishes a worker's state with a TTL: a worker that stops beating disappears by itself."""
        _check_name(stats.worker_id, "worker_id")
        previous = await self.redis.set(
            self.keys.worker(stats.worker_id),
            stats.SerializeToString(),
            px=max(1, int(ttl_s * 1000)),
            get=True,
        )
        if previous is None:
            await self.redis.sadd(self.keys.workers, stats.worker_id)
            await self._event("worker_up", worker_id=stats.worker_id, address=stats.address)

    async def list_workers(self) -> list[worker_pb2.WorkerStats]:
        """Live workers; ids whose heartbeat expired are dropped from the index (and announced)."""
        ids = sorted(i.decode() for i in await self.redis.smembers(self.keys.workers))
        if not ids:
            return []
        raws = await self.redis.mget([self.keys.worker(i) for i in ids])
        out = []
        for worker_id, raw in zip(ids, raws, strict=True):
            if raw is None:
                if await self.redis.srem(self.keys.workers, worker_id):
                    await self._event("worker_down", worker_id=worker_id, reason="heartbeat expired")
                continue
            stats = worker_pb2.WorkerStats()
            stats.ParseFromString(raw)
            out.append(stats)
        return out

    async def remove_worker(self, worker_id: str) -> None:
        await self.redis.delete(self.keys.worker(worker_id))
        if await self.redis.srem(self.keys.workers, worker_id):
            await self._event("worker_down", worker_id=worker_id, reason="deregistered")

    # ------------------------------------------------------------------ API keys
    @staticmethod
    def _hash_secret(secret: str) -> str:
        # Secrets are 256 random bits, so one SHA-256 is enough (no dictionary to defend against).
        return hashlib.sha256(secret.encode()).hexdigest()

    async def create_api_key(
        self,
        name: str,
        role: int = registry_pb2.INFER,
        models: Sequence[str] = (),
        rate_limit_rps: float = 0.0,
    ) -> tuple[str, str]:
        """Creates a key; returns (key_id, token). Only a hash of the secret is stored."""
        if not name.strip():  # the name is how operators tell keys apart in `maas keys list`
            raise InvalidArgument(f"name: a key needs a name, got {name!r}")
        if role not in (registry_pb2.INFER, registry_pb2.ADMIN):
            raise InvalidArgument(f"role: {role} is not INFER or ADMIN")
        if not rate_limit_rps >= 0:
            raise InvalidArgument(f"rate_limit_rps: must be >= 0, got {rate_limit_rps}")
        for i, model in enumerate(models):
            _check_name(model, f"models[{i}]")
        key_id = "k" + secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        await self.redis.hset(
            self.keys.api_key(key_id),
            mapping={
                "name": name,
                "role": str(role),
                "models": json.dumps(list(models)),
                "rate_limit_rps": str(rate_limit_rps),
                "secret_sha256": self._hash_secret(secret),
                "revoked": "0",
                "created_ms": str(_now_ms()),
            },
        )
        await self.redis.sadd(self.keys.api_keys, key_id)
        await self._event("api_key", key_id=key_id, action="created")
        return key_id, f"{key_id}.{secret}"

    def _decode_key(self, key_id: str, raw: dict[bytes, bytes]) -> ApiKey:
        return ApiKey(
            key_id=key_id,
            name=raw.get(b"name", b"").decode(),
            role=int(raw.get(b"role", b"1")),
            models=json.loads(raw.get(b"models", b"[]")),
            rate_limit_rps=float(raw.get(b"rate_limit_rps", b"0")),
            revoked=raw.get(b"revoked") == b"1",
            created_ms=int(raw.get(b"created_ms", b"0")),
        )

    async def verify_api_key(self, token: str) -> ApiKey | None:
        """The key a bearer token belongs to, or None when unknown, malformed, wrong or revoked."""
        key_id, _, secret = (token or "").partition(".")
        if not key_id or not secret or not _NAME.match(key_id):
            return None
        raw = await self.redis.hgetall(self.keys.api_key(key_id))
        if not raw or raw.get(b"revoked") == b"1":
            return None
        expected = raw.get(b"secret_sha256", b"").decode()
        if not hmac.compare_digest(expected, self._hash_secret(secret)):
            return None
        return self._decode_key(key_id, raw)

    async def revoke_api_key(self, key_id: str) -> bool:
        if not await self.redis.exists(self.keys.api_key(key_id)):
            raise NotFound(f"key_id: API key {key_id!r} does not exist")
        await self.redis.hset(self.keys.api_key(key_id), "revoked", "1")
        await self._event("api_key", key_id=key_id, action="revoked")
        return True

    async def list_api_keys(self) -> list[ApiKey]:
        ids = sorted(i.decode() for i in await self.redis.smembers(self.keys.api_keys))
        out = []
        for key_id in ids:
            raw = await self.redis.hgetall(self.keys.api_key(key_id))
            if raw:
                out.append(self._decode_key(key_id, raw))
        return out
