"""`maas config`: every setting of every service, with its variable, default and meaning."""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import typer
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings
from rich.table import Table

from mesh.cli.common import console
from mesh.settings import MeshSettings

app = typer.Typer(help="Configuration reference (environment variables).", no_args_is_help=True)

SERVICES = {
    "gateway": "gateway.settings:GatewaySettings",
    "router": "router.settings:RouterSettings",
    "worker": "workers.settings:WorkerSettings",
    "compressor": "compressor.settings:CompressorSettings",
}


def env_name(cls: type[BaseSettings], name: str, info: FieldInfo) -> str:
    alias = info.validation_alias
    choices = getattr(alias, "choices", None)
    if choices:
        return str(choices[0])
    if isinstance(alias, str):
        return alias
    return f"{cls.model_config.get('env_prefix', '')}{name}".upper()


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        return "(computed)"
    value: Any = info.default
    if value is None or value == "":
        return "unset" if value is None else '""'
    return str(value)


def rows(cls: type[BaseSettings], own_only: bool) -> list[tuple[str, str, str]]:
    out = []
    for name, info in cls.model_fields.items():
        if own_only and name in MeshSettings.model_fields:
            continue
        doc = " ".join((info.description or "").split())
        out.append((env_name(cls, name, info), _default(info), doc))
    return out


def markdown() -> str:
    lines = [
        "# Configuration",
        "",
        "Every service reads environment variables through a pydantic-settings class. This page is",
        "generated from those classes by `maas config show --markdown`; a test keeps it current.",
        "",
        "## Common to every service",
        "",
        "| variable | default | meaning |",
        "| --- | --- | --- |",
    ]
    lines += [f"| `{e}` | `{d}` | {doc} |" for e, d, doc in rows(MeshSettings, own_only=False)]
    for service, target in SERVICES.items():
        module, _, attr = target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        lines += [
            "",
            f"## {service} (`{cls.__name__}`)",
            "",
            "| variable | default | meaning |",
            "| --- | --- | --- |",
        ]
        lines += [f"| `{e}` | `{d}` | {doc} |" for e, d, doc in rows(cls, own_only=True)]
    return "\n".join(lines) + "\n"


def set_here(cls: type[BaseSettings], variable: str, environ: Mapping[str, str]) -> str:
    """The value this shell's environment gives `variable` ("" when unset); secrets are masked."""
    value = environ.get(variable)
    if value is None:
        return ""
    for name, info in cls.model_fields.items():
        if env_name(cls, name, info) == variable and "Secret" in str(info.annotation):
            return "(set, secret)"
    url = urlsplit(value)
    if url.password:  # redis://user:password@host: the password stays out of the terminal
        return value.replace(f":{url.password}@", ":***@", 1)
    return value


@app.command()
def show(as_markdown: bool = typer.Option(False, "--markdown", help="Print docs/configuration.md.")) -> None:
    """Lists every setting: environment variable, default, meaning, and the value this shell sets, if any
    (what the services and `maas` started from here would read)."""
    if as_markdown:
        print(markdown(), end="")
        return
    for service, target in {"common": "mesh.settings:MeshSettings", **SERVICES}.items():
        module, _, attr = target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        table = Table(title=service)
        for col in ("variable", "default", "set here", "meaning"):
            table.add_column(col)
        for variable, default, doc in rows(cls, own_only=service != "common"):
            table.add_row(variable, default, set_here(cls, variable, os.environ), doc)
        console.print(table)
