"""Registry heartbeat: the worker's WorkerStats under a key with a TTL, refreshed every interval."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from mesh_pb import worker_pb2

log = logging.getLogger(__name__)


class Heartbeat:
    """Writes `stats()` with `registry.heartbeat(stats, ttl_s)` every `interval_s`; a dead worker's key expires."""

    def __init__(
        self,
        registry: Any,
        stats: Callable[[], worker_pb2.WorkerStats],
        interval_s: float,
        ttl_s: float,
    ) -> None:
        self.registry = registry
        self._stats = stats
        self.interval_s = interval_s
        self.ttl_s = max(ttl_s, interval_s * 2)
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def beat(self) -> None:
        """One heartbeat now (errors are logged once per outage, never raised)."""
        try:
            await self.registry.heartbeat(self._stats(), self.ttl_s)
        except Exception as exc:
            if not self._failing:
                log.warning("heartbeat failed: %s: %s", type(exc).__name__, exc)
            self._failing = True
        else:
            if self._failing:
                log.info("heartbeat restored")
            self._failing = False

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.create_task(self._loop(), name="heartbeat")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.beat()

    async def stop(self, deregister: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if deregister:
            stats = self._stats()
            try:
                await self.registry.remove_worker(stats.worker_id)
            except Exception as exc:
                log.warning("deregistration failed: %s: %s", type(exc).__name__, exc)
