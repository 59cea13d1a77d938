"""`maas models ...`: list, show, register, alias, traffic and retire against the registry."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from google.protobuf import json_format
from rich.table import Table

from mesh.cli.common import cli_errors, console, open_registry, run
from mesh.errors import InvalidArgument
from mesh.registry import state_name
from mesh.settings import MeshSettings
from mesh.store import ArtifactStore
from mesh.versions import version_number
from mesh_pb import common_pb2, registry_pb2

app = typer.Typer(help="Models and versions in the registry.", no_args_is_help=True)

RedisOpt = Annotated[
    str | None, typer.Option("--redis-url", help="Registry URL (default: MAAS_REDIS_URL or the local stack).")
]


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else ""


def _sig(sig: common_pb2.Signature) -> str:
    def fmt(ts: object) -> str:
        return ", ".join(f"{t.name} {t.datatype}{list(t.shape)}" for t in ts)  # type: ignore[attr-defined]

    return f"{fmt(sig.inputs)} → {fmt(sig.outputs)}"


@app.command("list")
def list_models(redis_url: RedisOpt = None) -> None:
    """Every model with its versions, states, aliases and traffic split."""

    async def go() -> None:
        async with open_registry(redis_url) as reg:
            models = await reg.list_models(include_versions=True)
        table = Table(title="models")
        for col in ("model", "versions", "ready", "aliases", "traffic"):
            table.add_column(col)
        for m in models:
            ready = [str(v.ref.version) for v in m.versions if v.state == common_pb2.READY]
            aliases = ", ".join(f"{a}→{v}" for a, v in sorted(m.aliases.items()))
            traffic = ", ".join(f"v{t.version}:{t.weight:g}" for t in m.traffic)
            table.add_row(m.name, str(len(m.versions)), ", ".join(ready), aliases, traffic)
        console.print(table)

    run(go)


@app.command()
def show(model: str, redis_url: RedisOpt = None, as_json: bool = typer.Option(False, "--json")) -> None:
    """One model's versions: state, format, signature, lineage and metrics."""

    async def go() -> None:
        async with open_registry(redis_url) as reg:
            m = await reg.get_model(model)
        if as_json:
            console.print_json(json_format.MessageToJson(m, preserving_proto_field_name=True))
            return
        table = Table(
            title=f"{m.name}  aliases: {dict(m.aliases)}  traffic: {[(t.version, t.weight) for t in m.traffic]}"
        )
        for col in ("version", "state", "format", "dtype", "signature", "lineage", "created", "reason"):
            table.add_column(col)
        for v in m.versions:
            lineage = ""
            if v.lineage.methods:
                metrics = ", ".join(f"{k}={val:.4g}" for k, val in sorted(v.lineage.metrics.items()))
                lineage = f"v{v.lineage.parent_version} → {'+'.join(v.lineage.methods)} ({metrics})"
            table.add_row(
                str(v.ref.version), state_name(v.state), v.format, v.dtype, _sig(v.signature), lineage,
                _when(v.created_ms), v.reason,
            )  # fmt: skip
        console.print(table)

    run(go)


@app.command()
def register(
    model: str,
    artifact: Annotated[
        Path, typer.Option(help="Artifact file; copied into the model store.", exists=True, dir_okay=False)
    ],
    signature: Annotated[
        Path, typer.Option(help="JSON file of a maas.v1.Signature.", exists=True, dir_okay=False)
    ],
    format: Annotated[
        str, typer.Option(help="torch_export | torchscript | onnx | module_state")
    ] = "torch_export",
    dtype: str = "fp32",
    max_queue_delay_us: int = typer.Option(0, help="Dynamic batching delay; 0 = batching off."),
    redis_url: RedisOpt = None,
) -> None:
    """Copies an artifact into the store and registers it as the model's next version."""

    async def go() -> None:
        try:
            sig = json_format.Parse(signature.read_text(), common_pb2.Signature())
        except (json_format.ParseError, json.JSONDecodeError) as exc:
            raise InvalidArgument(f"signature: {signature} is not a valid Signature JSON: {exc}") from None
        settings = MeshSettings()
        store = ArtifactStore(settings.store_dir)
        async with open_registry(redis_url) as reg:
            staged = store.put_file(model, f"upload-{int(time.time() * 1000)}", artifact, artifact.name)
            req = registry_pb2.RegisterVersionRequest(
                model=model, artifact_uri=staged.uri, sha256=staged.sha256, format=format, signature=sig,
                dtype=dtype,
                batching=common_pb2.BatchingConfig(enabled=max_queue_delay_us > 0, max_queue_delay_us=max_queue_delay_us),
            )  # fmt: skip
            mv = await reg.register_version(req)
        console.print(
            f"registered [bold]{model}[/bold] version {mv.ref.version} ({state_name(mv.state)}), sha256 {mv.sha256[:12]}…"
        )

    run(go)


@app.command()
def alias(
    model: str,
    name: str,
    version: Annotated[int, typer.Argument(help="Version id; 0 removes the alias.")],
    redis_url: RedisOpt = None,
) -> None:
    """Points an alias (stable, canary, ...) at a READY version."""

    async def go() -> None:
        async with open_registry(redis_url) as reg:
            m = await reg.set_alias(model, name, version)
        console.print(f"{model} aliases: {dict(m.aliases)}")

    run(go)


@app.command()
def traffic(
    model: str,
    weights: Annotated[
        list[str], typer.Argument(help="VERSION=WEIGHT pairs, e.g. 1=90 2=10; none clears the split.")
    ] = [],  # noqa: B006
    redis_url: RedisOpt = None,
) -> None:
    """Splits traffic that names no version between READY versions."""

    async def go() -> None:
        pairs = []
        for i, item in enumerate(weights):
            version, sep, weight = item.partition("=")
            number = version_number(version)
            try:
                share = float(weight)
            except ValueError:
                share = None
            if not sep or number is None or share is None:
                raise InvalidArgument(f"weights[{i}]: {item!r} is not VERSION=WEIGHT")
            pairs.append((number, share))
        async with open_registry(redis_url) as reg:
            m = await reg.set_traffic(model, pairs)
        console.print(f"{model} traffic: {[(t.version, t.weight) for t in m.traffic]}")

    run(go)


@app.command()
def retire(
    model: str,
    version: int,
    reason: str = "retired by operator",
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Retire it even if it is the 'stable' version, or the last READY one of a model with a "
            "traffic split (the model then has nothing to serve).",
        ),
    ] = False,
    redis_url: RedisOpt = None,
) -> None:
    """Takes a version out of service (terminal); its aliases and traffic share are removed."""

    async def go() -> None:
        async with open_registry(redis_url) as reg:
            mv = await reg.set_state(model, version, common_pb2.RETIRED, reason, force=force)
        console.print(f"{model}:{mv.ref.version} is {state_name(mv.state)}")

    run(go)


__all__ = ["app", "cli_errors"]
