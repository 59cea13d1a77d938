"""Helpers shared by CLI sub-commands: settings, registry connection, error display."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
import typer
from rich.console import Console

from mesh.errors import MeshError, from_rpc_error
from mesh.registry import Registry
from mesh.settings import MeshSettings

T = TypeVar("T")
console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Prints a typed error as `CODE: message` and exits 1 instead of a traceback."""
    try:
        yield
    except grpc.RpcError as exc:
        error = from_rpc_error(exc)
        err_console.print(f"[red]{error.code.name}[/red]: {error.message}")
        raise typer.Exit(1) from None
    except MeshError as exc:
        err_console.print(f"[red]{exc.code.name}[/red]: {exc.message}")
        raise typer.Exit(1) from None


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    with cli_errors():
        return asyncio.run(fn(*args))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def open_registry(redis_url: str | None) -> AsyncIterator[Registry]:
    """The registry named by --redis-url / MAAS_REDIS_URL, else the local stack's embedded server."""
    settings = MeshSettings()
    url = redis_url or settings.redis_url or local_redis_url(settings)
    try:
        registry = await Registry.connect(url, settings.key_prefix)
    except Exception as exc:  # connection refused, missing socket
        err_console.print(f"[red]UNAVAILABLE[/red]: cannot reach the registry at {url}: {exc}")
        raise typer.Exit(1) from None
    try:
        yield registry
    finally:
        await registry.close()


def local_redis_url(settings: MeshSettings) -> str:
    """The embedded server that `make up` runs under var/redis."""
    sock = (settings.var_dir / "redis" / "redis.sock").resolve()
    return f"unix://{sock}"
