"""Redis job queue: a stream read by a consumer group (XADD / XREADGROUP / XACK, XAUTOCLAIM of stale
leases) and one record per job, under the key names of `mesh.registry.Keys`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError, WatchError

from mesh.errors import FailedPrecondition, NotFound
from mesh.registry import Keys
from mesh_pb import compressor_pb2

logger = logging.getLogger(__name__)

JS = compressor_pb2.JobState
TERMINAL = frozenset({JS.JOB_SUCCEEDED, JS.JOB_REJECTED, JS.JOB_FAILED, JS.JOB_CANCELLED})
STREAM_MAXLEN = 100_000

# Record, index and stream entry in one step, only when the job does not exist yet.
_CREATE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'data', ARGV[1], 'cancel', '0')
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'job_id', ARGV[3])
return 1
"""


def now_ms() -> int:
    return int(time.time() * 1000)


def state_name(state: int) -> str:
    return compressor_pb2.JobState.Name(state)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Claim:
    """A stream message this consumer now holds: the job to run and whether it was taken from a dead peer."""

    message_id: str
    job_id: str
    reclaimed: bool


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class JobQueue:
    """Job records and the work stream. One instance per compressor; `consumer` names it in the group."""

    def __init__(self, client: aioredis.Redis, keys: Keys, *, consumer: str, lease_ms: int = 30_000) -> None:
        self.redis = client
        self.keys = keys
        self.consumer = consumer
        self.lease_ms = lease_ms
        self._create = client.register_script(_CREATE_LUA)

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.jobs_stream, self.keys.jobs_group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # ------------------------------------------------------------------ records
    async def create(self, job: compressor_pb2.Job) -> tuple[compressor_pb2.Job, bool]:
        """Stores and enqueues a new job; with an existing job_id returns that job instead (idempotent)."""
        created = await self._create(
            keys=[self.keys.job(job.job_id), self.keys.jobs_index, self.keys.jobs_stream],
            args=[job.SerializeToString(), str(job.created_ms), job.job_id, str(STREAM_MAXLEN)],
        )
        if not int(created):
            return await self.get(job.job_id), False
        return job, True

    async def get(self, job_id: str) -> compressor_pb2.Job:
        raw = await self.redis.hget(self.keys.job(job_id), "data")
        if raw is None:
            raise NotFound(f"job_id: job {job_id!r} is not found")
        job = compressor_pb2.Job()
        job.ParseFromString(raw)
        return job

    async def list(self, limit: int = 100) -> list[compressor_pb2.Job]:
        """Newest first."""
        ids: list[Any] = await self.redis.zrevrange(self.keys.jobs_index, 0, max(1, limit) - 1)
        jobs = []
        for raw_id in ids:
            try:
                jobs.append(await self.get(_text(raw_id)))
            except NotFound:
                continue
        return jobs

    async def update(
        self, job_id: str, mutate: Callable[[compressor_pb2.Job], bool | None]
    ) -> compressor_pb2.Job:
        """Applies `mutate` atomically (optimistic WATCH/MULTI). `mutate` returns False to leave it as is."""
        key = self.keys.job(job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.hget(key, "data")
                    if raw is None:
                        raise NotFound(f"job_id: job {job_id!r} is not found")
                    job = compressor_pb2.Job()
                    job.ParseFromString(raw)
                    if mutate(job) is False:
                        await pipe.unwatch()
                        return job
                    job.updated_ms = now_ms()
                    pipe.multi()
                    pipe.hset(key, "data", job.SerializeToString())
                    await pipe.execute()
                    return job
                except WatchError:
                    continue

    async def request_cancel(self, job_id: str) -> compressor_pb2.Job:
        """A queued job ends CANCELLED at once; a running one gets the cancel flag its runner polls."""
        await self.redis.hset(self.keys.job(job_id), "cancel", "1")

        def mutate(job: compressor_pb2.Job) -> bool:
            if job.state in TERMINAL:
                raise FailedPrecondition(f"job_id: job {job_id} already ended {state_name(job.state)}")
            if job.state == JS.JOB_QUEUED:
                job.state = JS.JOB_CANCELLED
                job.message = "cancelled before it started"
                job.stage = "cancelled"
                return True
            job.stage = "cancelling"
            return True

        return await self.update(job_id, mutate)

    async def cancel_requested(self, job_id: str) -> bool:
        return (await self.redis.hget(self.keys.job(job_id), "cancel")) in (b"1", "1")

    # ------------------------------------------------------------------ stream
    async def claim(self, block_ms: int = 1000) -> Claim | None:
        """A message whose holder stopped renewing its lease (XAUTOCLAIM), else a new one (XREADGROUP)."""
        reply: Any = await self.redis.xautoclaim(
            self.keys.jobs_stream,
            self.keys.jobs_group,
            self.consumer,
            min_idle_time=self.lease_ms,
            start_id="0-0",
            count=1,
        )
        messages: list[Any] = reply[1]
        for message_id, fields in messages:
            if fields:
                return Claim(_text(message_id), _text(fields[b"job_id"]), reclaimed=True)
        result: Any = await self.redis.xreadgroup(
            self.keys.jobs_group, self.consumer, {self.keys.jobs_stream: ">"}, count=1, block=block_ms or None
        )
        for _stream, entries in result or []:
            for message_id, fields in entries:
                return Claim(_text(message_id), _text(fields[b"job_id"]), reclaimed=False)
        return None

    async def owner(self, message_id: str) -> str | None:
        """The consumer currently holding a message (None once it is acknowledged)."""
        pending: Any = await self.redis.xpending_range(
            self.keys.jobs_stream, self.keys.jobs_group, min=message_id, max=message_id, count=1
        )
        if not pending:
            return None
        return _text(pending[0]["consumer"])

    async def renew(self, message_id: str) -> bool:
        """Resets the message's idle time (the lease); False when another consumer has taken it over."""
        if await self.owner(message_id) != self.consumer:
            return False
        await self.redis.xclaim(
            self.keys.jobs_stream,
            self.keys.jobs_group,
            self.consumer,
            min_idle_time=0,
            message_ids=[message_id],
            justid=True,
        )
        return True

    async def ack(self, message_id: str) -> None:
        await self.redis.xack(self.keys.jobs_stream, self.keys.jobs_group, message_id)
