"""`maas demo`: build the demo models locally and register them in the registry."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from collections.abc import Callable

    from mesh.settings import MeshSettings
    from mesh_pb import common_pb2

app = typer.Typer(help="Demo models (digits, tinylm, encoder): build locally, register in the registry.")


@app.callback()
def _group() -> None:
    """Demo models: build locally and register them."""


def _parse_models(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise typer.BadParameter("name at least one model, e.g. digits,tinylm,encoder")
    return names


@app.command("build")
def build(
    models: Annotated[
        str, typer.Option("--models", "-m", help="Comma-separated demo models to build.")
    ] = "digits,tinylm,encoder",
    encoder_size: Annotated[
        str, typer.Option("--encoder-size", help="Encoder preset: small (CPU), base (12×768, GPU), tiny.")
    ] = "small",
    force: Annotated[
        bool, typer.Option("--force", help="Build and register even if a demo version exists.")
    ] = False,
    redis_url: Annotated[
        str | None,
        typer.Option("--redis-url", help="Registry URL (default: MAAS_REDIS_URL, else the embedded server)."),
    ] = None,
    store_dir: Annotated[
        Path | None, typer.Option("--store-dir", help="Artifact store root (default: MAAS_STORE_DIR).")
    ] = None,
    key_prefix: Annotated[
        str | None, typer.Option("--key-prefix", help="Registry key prefix (default: MAAS_KEY_PREFIX).")
    ] = None,
    digits_epochs: Annotated[int, typer.Option(help="Training epochs of digits.")] = 30,
    tinylm_steps: Annotated[int, typer.Option(help="Training steps of tinylm.")] = 300,
    replicas: Annotated[
        int, typer.Option(min=1, help="Workers each demo version is kept on (min_replicas).")
    ] = 1,
) -> None:
    """Train/build the demo models, store their artifacts and register one version each."""
    from rich.console import Console
    from rich.table import Table

    from mesh.cli.common import run
    from mesh.settings import MeshSettings
    from workers.demo import DEMO_MODELS
    from workers.models.encoder import encoder_config

    settings = MeshSettings()
    names = _parse_models(models)
    # Bad names are usage errors, caught before anything connects or trains.
    unknown = [n for n in names if n not in DEMO_MODELS]
    if unknown:
        raise typer.BadParameter(
            f"unknown demo model(s) {', '.join(unknown)}; expected some of {', '.join(DEMO_MODELS)}",
            param_hint="--models",
        )
    try:
        encoder_config(encoder_size)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--encoder-size") from None
    console = Console(log_path=False)
    with console.status("building demo models…") as status:

        def progress(message: str) -> None:
            status.update(message)
            console.log(message)

        versions = run(
            _run,
            settings,
            names,
            encoder_size,
            force,
            redis_url or settings.redis_url,
            store_dir or settings.store_dir,
            key_prefix or settings.key_prefix,
            digits_epochs,
            tinylm_steps,
            progress,
            replicas,
        )
    table = Table(title="demo versions")
    for column in ("model", "version", "state", "format", "dtype", "artifact", "accuracy"):
        table.add_column(column, overflow="fold")
    for mv in versions:
        table.add_row(
            mv.ref.name,
            str(mv.ref.version),
            _state_name(mv.state),
            mv.format,
            mv.dtype,
            mv.artifact_uri,
            mv.labels.get("accuracy", ""),
        )
    console.print(table)


def _state_name(state: int) -> str:
    from mesh_pb import common_pb2

    return str(common_pb2.VersionState.Name(state))


async def _run(
    settings: MeshSettings,
    names: list[str],
    encoder_size: str,
    force: bool,
    redis_url: str | None,
    store_dir: Path,
    key_prefix: str,
    digits_epochs: int,
    tinylm_steps: int,
    progress: Callable[[str], None],
    replicas: int = 1,
) -> list[common_pb2.ModelVersion]:
    from mesh.errors import Unavailable
    from mesh.redis_embed import EmbeddedRedis
    from mesh.registry import Registry
    from mesh.store import ArtifactStore
    from workers.demo import build_demo

    embedded: EmbeddedRedis | None = None
    url = redis_url
    if not url:
        # No URL: the stack's embedded server under var/ (started here, persistent, when not running).
        data_dir = Path(settings.var_dir) / "redis"
        sock = data_dir / "redis.sock"
        url = f"unix://{sock.resolve()}" if sock.exists() else None
        if url is not None:
            try:
                registry = await Registry.connect(url, key_prefix)
                await registry.close()
            except Exception:
                url = None
        if url is None:
            embedded = EmbeddedRedis(data_dir, persist=True)
            url = embedded.start()
    try:
        try:
            registry = await Registry.connect(url, key_prefix)
        except Exception as exc:  # connection refused, missing socket: one line, as open_registry says it
            raise Unavailable(f"cannot reach the registry at {url}: {exc}") from None
        try:
            return await build_demo(
                registry,
                ArtifactStore(store_dir),
                names=names,
                encoder_size=encoder_size,
                progress=progress,
                force=force,
                digits_epochs=digits_epochs,
                tinylm_steps=tinylm_steps,
                min_replicas=replicas,
            )
        finally:
            await registry.close()
    finally:
        if embedded is not None:
            embedded.stop()
