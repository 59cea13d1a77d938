"""`maas keys ...`: API keys (bearer tokens) with roles, model scopes and rate limits."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from mesh.cli.common import console, open_registry, run
from mesh.errors import InvalidArgument
from mesh_pb import registry_pb2

app = typer.Typer(
    help="API keys for the gateway and the router (written to the registry directly).", no_args_is_help=True
)
RedisOpt = Annotated[
    str | None, typer.Option("--redis-url", help="Registry URL (default: MAAS_REDIS_URL or the local stack).")
]


@app.command()
def create(
    name: str,
    role: Annotated[str, typer.Option(help="infer | admin")] = "infer",
    model: Annotated[
        list[str], typer.Option("--model", help="Model the key may use (repeat); none = all.")
    ] = [],  # noqa: B006
    rate: Annotated[float, typer.Option(help="Requests per second; 0 = the gateway default.")] = 0.0,
    redis_url: RedisOpt = None,
) -> None:
    """Creates a key and prints its token once (only a hash is stored)."""

    async def go() -> None:
        roles = {"infer": registry_pb2.INFER, "admin": registry_pb2.ADMIN}
        if role not in roles:
            raise InvalidArgument(f"role: {role!r} is not infer or admin")
        async with open_registry(redis_url) as reg:
            known = {m.name for m in await reg.list_models()}
            key_id, token = await reg.create_api_key(name, roles[role], model, rate)
        console.print(f"key id: {key_id}\ntoken (shown once): [bold]{token}[/bold]")
        unknown = sorted(set(model) - known)
        if unknown:  # allowed (a model registered later), but more often a typo
            console.print(
                f"[yellow]note: no model named {', '.join(map(repr, unknown))} is registered yet[/]"
            )

    run(go)


@app.command("list")
def list_keys(redis_url: RedisOpt = None) -> None:
    """Keys with their roles, scopes and state (never the secrets)."""

    async def go() -> None:
        async with open_registry(redis_url) as reg:
            keys = await reg.list_api_keys()
        table = Table(title="API keys")
        for col in ("key id", "name", "role", "models", "rate/s", "revoked"):
            table.add_column(col)
        for k in keys:
            role = "admin" if k.is_admin else "infer"
            table.add_row(
                k.key_id, k.name, role, ", ".join(k.models) or "*", f"{k.rate_limit_rps:g}", str(k.revoked)
            )
        console.print(table)

    run(go)


@app.command()
def revoke(key_id: str, redis_url: RedisOpt = None) -> None:
    """Revokes a key; gateways refuse it within seconds."""

    async def go() -> None:
        async with open_registry(redis_url) as reg:
            await reg.revoke_api_key(key_id)
        console.print(f"revoked {key_id}")

    run(go)
