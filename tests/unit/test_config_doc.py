"""docs/configuration.md is generated from the settings classes and must stay current."""

from __future__ import annotations

from pathlib import Path

from mesh.cli.config import SERVICES, markdown
from mesh.settings import MeshSettings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_doc_is_current() -> None:
    assert DOC.read_text() == markdown(), (
        "regenerate: .venv/bin/maas config show --markdown > docs/configuration.md"
    )


def test_every_setting_is_documented() -> None:
    import importlib

    classes = [MeshSettings]
    for target in SERVICES.values():
        module, _, attr = target.partition(":")
        classes.append(getattr(importlib.import_module(module), attr))
    for cls in classes:
        for name, info in cls.model_fields.items():
            assert info.description, f"{cls.__name__}.{name} has no docstring"


def test_common_settings_read_one_variable_name(monkeypatch: object) -> None:
    from workers.settings import WorkerSettings

    mp = monkeypatch  # pytest's MonkeyPatch
    mp.setenv("MAAS_REDIS_URL", "redis://example:1/0")  # type: ignore[attr-defined]
    mp.setenv("MAAS_KEY_PREFIX", "p1")  # type: ignore[attr-defined]
    s = WorkerSettings()
    assert s.redis_url == "redis://example:1/0" and s.key_prefix == "p1"


def test_show_names_what_this_shell_sets_and_masks_secrets() -> None:
    from gateway.settings import GatewaySettings
    from mesh.cli.config import set_here

    environ = {"MAAS_REDIS_URL": "unix:///tmp/x.sock", "MAAS_GATEWAY_ROUTER_API_KEY": "mk_secret"}
    assert set_here(MeshSettings, "MAAS_REDIS_URL", environ) == "unix:///tmp/x.sock"
    assert set_here(MeshSettings, "MAAS_KEY_PREFIX", environ) == ""
    with_password = {"MAAS_REDIS_URL": "redis://app:hunter2@db:6379/0"}
    assert set_here(MeshSettings, "MAAS_REDIS_URL", with_password) == "redis://app:***@db:6379/0"
    assert set_here(GatewaySettings, "MAAS_GATEWAY_ROUTER_API_KEY", environ) == "(set, secret)"
