"""RouteWatcher: follows the router's WatchRoutes stream with reconnects, feeding each table to a callback."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence

import grpc
import grpc.aio

from mesh.aio import wait_event
from mesh.server import open_channel
from mesh.settings import MeshSettings
from mesh_pb import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class RouteWatcher:
    """Subscribes to `RouterService.WatchRoutes`; calls `on_table(table)` for every table received.

    While the router is unreachable nothing is called, so the consumer (the gateway's Picker) keeps
    serving from its last table; the watcher reconnects with jittered exponential backoff. `metadata`
    goes with every WatchRoutes call (e.g. `mesh.auth.bearer_metadata(key)` for a router requiring keys).
    """

    def __init__(
        self,
        address: str,
        on_table: Callable[[router_pb2.RouteTable], object],
        *,
        subscriber: str = "",
        settings: MeshSettings | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 2.0,
    ) -> None:
        self.address = address
        self.on_table = on_table
        self.subscriber = subscriber
        self.settings = settings
        self.metadata = tuple(metadata)
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.last_table: router_pb2.RouteTable | None = None
        self.connected = False
        self.tables_received = 0
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._first = asyncio.Event()
        self._new_table = asyncio.Event()

    async def start(self) -> None:
        """Starts following the stream in a background task (returns at once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="route-watcher")

    async def wait_for_table(self, timeout: float = 5.0) -> router_pb2.RouteTable:
        """The first table (raises TimeoutError if none arrives in time)."""
        if not await wait_event(self._first, timeout):
            raise TimeoutError(f"no route table from {self.address} within {timeout} s")
        assert self.last_table is not None
        return self.last_table

    async def wait_for(
        self, predicate: Callable[[router_pb2.RouteTable], bool], timeout: float = 5.0
    ) -> router_pb2.RouteTable:
        """The first table (the current one included) for which `predicate` holds."""

        async def loop() -> router_pb2.RouteTable:
            while True:
                self._new_table.clear()
                table = self.last_table
                if table is not None and predicate(table):
                    return table
                await self._new_table.wait()

        async with asyncio.timeout(timeout):
            return await loop()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None
        self.connected = False

    async def _run(self) -> None:
        delay = self.backoff_initial_s
        self._channel = open_channel(self.address, self.settings)
        stub = router_pb2_grpc.RouterServiceStub(self._channel)
        request = router_pb2.WatchRoutesRequest(subscriber=self.subscriber)
        refused: grpc.StatusCode | None = None
        while True:
            try:
                call = stub.WatchRoutes(request, metadata=self.metadata)
                async for table in call:
                    if not self.connected:
                        log.info("following routes from %s", self.address)
                    self.connected = True
                    refused = None
                    delay = self.backoff_initial_s
                    self._deliver(table)
                log.info("route stream from %s ended; reconnecting", self.address)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as err:
                if err.code() in _REFUSED:
                    # A wrong or missing key does not fix itself: say so once, at warning level.
                    if refused != err.code():
                        log.warning("router %s refused the route stream: %s", self.address, err.details())
                    refused = err.code()
                elif self.connected:
                    log.warning(
                        "route stream from %s lost: %s; keeping the last table", self.address, err.code()
                    )
                else:
                    log.debug("router %s not reachable: %s", self.address, err.code())
            except Exception:
                log.exception("route watcher error; reconnecting")
            self.connected = False
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(self.backoff_max_s, delay * 2)

    def _deliver(self, table: router_pb2.RouteTable) -> None:
        self.last_table = table
        self.tables_received += 1
        try:
            self.on_table(table)
        except Exception:
            log.exception("route table consumer failed on revision %s", table.revision)
        self._first.set()
        self._new_table.set()
