"""grpcio's process switches (mesh/grpcenv.py) are in place before grpc loads, in every entry point."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mesh import grpcenv

# Records the environment at the moment `grpc` is first imported, whatever imports it.
_PROBE = """
import os, sys

seen = []

class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "grpc" and not seen:
            seen.append(os.environ.get("GRPC_EXPERIMENTS", "<unset>"))
        return None

sys.meta_path.insert(0, Probe())
import {package}
import grpc
print(seen[0])
"""


def _run(package: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(package=package)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


@pytest.mark.parametrize(
    "package", ["gateway", "router", "workers", "compressor", "mesh.cli", "mesh.benchtools"]
)
def test_entry_points_set_grpc_experiments_before_grpc_loads(package: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    assert _run(package, env) == grpcenv.GRPC_EXPERIMENTS


def test_an_exported_value_wins() -> None:
    env = {**os.environ, "GRPC_EXPERIMENTS": "-event_engine_callback_cq"}
    assert _run("gateway", env) == "-event_engine_callback_cq"
