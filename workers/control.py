"""maas.v1.WorkerControl: what the router asks of a worker (load, unload, drain, stats)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from mesh.errors import InvalidArgument
from mesh_pb import worker_pb2, worker_pb2_grpc
from workers.service import ModelManager


class WorkerControlServicer(worker_pb2_grpc.WorkerControlServicer):
    """Thin adapter over ModelManager; `drain` and `address` come from the WorkerApp."""

    def __init__(
        self,
        manager: ModelManager,
        address: Callable[[], str],
        drain: Callable[[float], Awaitable[bool]],
        default_drain_timeout_s: float,
    ) -> None:
        self.manager = manager
        self._address = address
        self._drain = drain
        self._default_timeout = default_drain_timeout_s

    def _stats(self) -> worker_pb2.WorkerStats:
        return self.manager.worker_stats(self._address())

    async def LoadVersion(
        self, request: worker_pb2.LoadVersionRequest, context: Any
    ) -> worker_pb2.WorkerStats:
        if not request.HasField("version"):
            raise InvalidArgument("version: the ModelVersion record to load is required")
        await self.manager.load(request.version)
        return self._stats()

    async def UnloadVersion(
        self, request: worker_pb2.UnloadVersionRequest, context: Any
    ) -> worker_pb2.WorkerStats:
        ref = request.ref
        if not ref.name or ref.version <= 0:
            raise InvalidArgument("ref: a model name and a version > 0 are required")
        await self.manager.unload(ref.name, int(ref.version))
        return self._stats()

    async def Drain(self, request: worker_pb2.DrainRequest, context: Any) -> worker_pb2.WorkerStats:
        if request.timeout_s < 0:
            raise InvalidArgument("timeout_s: must be >= 0")
        await self._drain(request.timeout_s or self._default_timeout)
        return self._stats()

    async def GetStats(self, request: worker_pb2.GetStatsRequest, context: Any) -> worker_pb2.WorkerStats:
        return self._stats()
