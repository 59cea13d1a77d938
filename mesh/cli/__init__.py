"""The `maas` command line: registry admin, demo models, compression jobs, inference, benchmarks."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="maas",
    help="MaaS mesh: models as a service over KServe v2 gRPC.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

# Sub-commands live in their own modules; service packages (and torch) load only when a command runs.
_SUBAPPS = {
    "models": "mesh.cli.models",
    "keys": "mesh.cli.keys",
    "config": "mesh.cli.config",
    "demo": "mesh.cli.demo",
}
_REGISTRARS = ("mesh.cli.compress", "mesh.cli.infer", "mesh.cli.bench")

for _name, _module in _SUBAPPS.items():
    app.add_typer(importlib.import_module(_module).app, name=_name)
for _module in _REGISTRARS:
    importlib.import_module(_module).register(app)


def main() -> None:
    app()
