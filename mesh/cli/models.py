"""`maas models ...`: list, show, register, alias, traffic and retire against the registry."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from google.protobuf import json_format
from rich.table import Table

from mesh.cli.common import cli_errors, console, open_registry, run
from mesh.errors import InvalidArgument
from mesh.registry import state_name, validate_artifact
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


def split_text(traffic: Sequence[common_pb2.TrafficWeight]) -> str:
    """`v1 90%, v2 10%`: the share each version gets, since weights are relative (1=9 2=1 is 90/10)."""
    total = sum(t.weight for t in traffic if t.weight > 0)
    if total <= 0:
        return "none"
    return ", ".join(f"v{t.version} {_percent(100.0 * t.weight / total)}" for t in traffic if t.weight > 0)


def _percent(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0") + "%"


def _lineage_row(v: common_pb2.ModelVersion) -> list[str]:
    """A compressed version's key figures (`--json` has every metric): parent, methods, accuracy and
    its change in points, size and latency as fractions of the parent's."""
    m = v.lineage.metrics
    accuracy = f"{m['accuracy']:.3f}" if "accuracy" in m else ""
    if "accuracy" in m and "parent_accuracy" in m:
        accuracy += f" ({100.0 * (m['accuracy'] - m['parent_accuracy']):+.1f} pt)"
    size = latency = ""
    if m.get("size_bytes") and m.get("parent_size_bytes"):
        size = f"×{m['size_bytes'] / m['parent_size_bytes']:.2f}"
    if m.get("latency_ms") and m.get("parent_latency_ms"):
        latency = f"×{m['latency_ms'] / m['parent_latency_ms']:.2f}"
    methods = " → ".join(v.lineage.methods)
    return [str(v.ref.version), f"v{v.lineage.parent_version}", methods, accuracy, size, latency]


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
            traffic = split_text(m.traffic) if m.traffic else ""
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
        aliases = ", ".join(f"{a}→{v}" for a, v in sorted(m.aliases.items())) or "none"
        console.print(f"[bold]{m.name}[/bold]  aliases: {aliases}  traffic: {split_text(m.traffic)}")
        # Versions of a model nearly always share one signature (compression keeps it): printed once,
        # the table keeps room at 80 columns; lineage figures get a table of their own.
        signatures = {_sig(v.signature) for v in m.versions}
        if len(signatures) == 1:
            console.print(f"signature: {signatures.pop()}", highlight=False)
        table = Table(title="versions")
        for col in ("version", "state", "format", "dtype", "created"):
            table.add_column(col, no_wrap=True)
        if len(signatures) > 1:
            table.add_column("signature", overflow="fold")
        table.add_column("reason", overflow="fold")
        for v in m.versions:
            row = [str(v.ref.version), state_name(v.state), v.format, v.dtype, _when(v.created_ms)]
            if len(signatures) > 1:
                row.append(_sig(v.signature))
            table.add_row(*row, v.reason)
        console.print(table)
        compressed = [v for v in m.versions if v.lineage.methods]
        if compressed:
            lineage = Table(title="lineage (size, latency: × the parent's; --json has every metric)")
            for col in ("version", "parent", "methods", "accuracy", "size", "latency"):
                lineage.add_column(col, overflow="fold")
            for v in compressed:
                lineage.add_row(*_lineage_row(v))
            console.print(lineage)

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
    dtype: Annotated[str, typer.Option(help="fp32 | fp16 | bf16")] = "fp32",
    max_queue_delay_us: int = typer.Option(0, help="Dynamic batching delay; 0 = batching off."),
    store_dir: Annotated[
        Path | None,
        typer.Option(
            "--store-dir",
            help="Model store the artifact is copied into (default: MAAS_STORE_DIR, else var/models under "
            "the current directory). It must be the store the workers of the --redis-url registry read, "
            "or the version fails to load.",
        ),
    ] = None,
    redis_url: RedisOpt = None,
) -> None:
    """Copies an artifact into the store and registers it as the model's next version."""

    async def go() -> None:
        try:
            sig = json_format.Parse(signature.read_text(), common_pb2.Signature())
        except (json_format.ParseError, json.JSONDecodeError) as exc:
            raise InvalidArgument(f"signature: {signature} is not a valid Signature JSON: {exc}") from None
        # What the registry would refuse is refused before the artifact is copied (no orphan upload).
        validate_artifact(format, dtype, sig)
        store = ArtifactStore(store_dir or MeshSettings().store_dir)
        async with open_registry(redis_url) as reg:
            upload = f"upload-{int(time.time() * 1000)}"
            staged = store.put_file(model, upload, artifact, artifact.name)
            req = registry_pb2.RegisterVersionRequest(
                model=model, artifact_uri=staged.uri, sha256=staged.sha256, format=format, signature=sig,
                dtype=dtype,
                batching=common_pb2.BatchingConfig(enabled=max_queue_delay_us > 0, max_queue_delay_us=max_queue_delay_us),
            )  # fmt: skip
            try:
                mv = await reg.register_version(req)
            except BaseException:
                # Refused (or interrupted): no version references the copy, so it goes.
                shutil.rmtree(store.resolve(staged.uri).parent, ignore_errors=True)
                raise
        console.print(
            f"registered [bold]{model}[/bold] version {mv.ref.version} ({state_name(mv.state)}), "
            f"sha256 {mv.sha256[:12]}…, artifact {mv.artifact_uri} in the store {store.root}",
            highlight=False,
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
        console.print(f"{model} traffic: {split_text(m.traffic)}")

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
