"""`maas models` and `maas keys` against a real registry."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mesh.cli import app
from mesh.registry import Registry
from mesh_pb import common_pb2

runner = CliRunner()


def on_registry(redis_url: str, prefix: str, fn):  # type: ignore[no-untyped-def]
    """Runs fn(registry) on a fresh loop: the CLI under test runs its own loop, so tests stay sync."""

    async def go():  # type: ignore[no-untyped-def]
        reg = await Registry.connect(redis_url, prefix)
        try:
            return await fn(reg)
        finally:
            await reg.close()

    return asyncio.run(go())


@pytest.fixture
def env(redis_url: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MAAS_REDIS_URL", redis_url)
    monkeypatch.setenv("MAAS_KEY_PREFIX", prefix)
    monkeypatch.setenv("MAAS_STORE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("COLUMNS", "200")
    return tmp_path


def test_models_register_alias_traffic_retire(env: Path, redis_url: str, prefix: str) -> None:
    artifact = env / "model.pt2"
    artifact.write_bytes(b"not really a model")
    sig = env / "sig.json"
    sig.write_text(json.dumps({
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
        "max_batch_size": 64,
    }))  # fmt: skip
    for _ in range(2):
        result = runner.invoke(
            app, ["models", "register", "digits", "--artifact", str(artifact), "--signature", str(sig)]
        )
        assert result.exit_code == 0, result.output
    assert "version 2" in result.output
    for v in (1, 2):
        on_registry(redis_url, prefix, lambda r, v=v: r.set_state("digits", v, common_pb2.READY))

    assert runner.invoke(app, ["models", "alias", "digits", "stable", "1"]).exit_code == 0
    result = runner.invoke(app, ["models", "traffic", "digits", "1=90", "2=10"])
    assert result.exit_code == 0, result.output
    model = on_registry(redis_url, prefix, lambda r: r.get_model("digits"))
    assert dict(model.aliases) == {"stable": 1}
    assert [(t.version, t.weight) for t in model.traffic] == [(1, 90.0), (2, 10.0)]

    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0 and "digits" in result.output and "stable→1" in result.output
    result = runner.invoke(app, ["models", "show", "digits"])
    assert result.exit_code == 0 and "READY" in result.output

    assert runner.invoke(app, ["models", "retire", "digits", "2"]).exit_code == 0
    assert on_registry(redis_url, prefix, lambda r: r.get_version("digits", 2)).state == common_pb2.RETIRED
    # Version 1 is stable (and the last READY one): a plain retire is refused with a way out.
    result = runner.invoke(app, ["models", "retire", "digits", "1"])
    assert result.exit_code == 1
    assert "FAILED_PRECONDITION" in result.output and "stable" in result.output and "--force" in result.output
    assert on_registry(redis_url, prefix, lambda r: r.get_version("digits", 1)).state == common_pb2.READY
    result = runner.invoke(app, ["models", "retire", "digits", "1", "--force"])
    assert result.exit_code == 0, result.output
    assert on_registry(redis_url, prefix, lambda r: r.get_version("digits", 1)).state == common_pb2.RETIRED


def test_clear_errors(env: Path) -> None:
    result = runner.invoke(app, ["models", "show", "nope"])
    assert result.exit_code == 1 and "NOT_FOUND" in result.output and "nope" in result.output
    for bad in ("1=x", "\u0661=50", "\u00b2=50", "90"):  # "١" and "²" are no version numbers
        result = runner.invoke(app, ["models", "traffic", "nope", bad])
        assert result.exit_code == 1 and "INVALID_ARGUMENT" in result.output and "weights[0]" in result.output
    bad_sig = env / "bad.json"
    bad_sig.write_text(
        '{"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1]}], "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}]}'
    )
    art = env / "a.bin"
    art.write_bytes(b"x")
    result = runner.invoke(
        app, ["models", "register", "m", "--artifact", str(art), "--signature", str(bad_sig)]
    )
    assert result.exit_code == 1 and "signature.inputs[0].datatype" in result.output


def test_keys(env: Path, redis_url: str, prefix: str) -> None:
    result = runner.invoke(app, ["keys", "create", "team-a", "--model", "digits", "--rate", "5"])
    assert result.exit_code == 0, result.output
    token = result.output.split("token (shown once): ")[1].split()[0]
    key = on_registry(redis_url, prefix, lambda r: r.verify_api_key(token))
    assert key is not None and key.models == ["digits"]
    listing = runner.invoke(app, ["keys", "list"])
    assert key.key_id in listing.output and token.split(".")[1] not in listing.output
    assert runner.invoke(app, ["keys", "revoke", key.key_id]).exit_code == 0
    assert on_registry(redis_url, prefix, lambda r: r.verify_api_key(token)) is None


@pytest.mark.parametrize("name", ["", "   ", "\t"])
def test_keys_need_a_name(env: Path, redis_url: str, prefix: str, name: str) -> None:
    result = runner.invoke(app, ["keys", "create", name, "--rate", "5"])
    assert result.exit_code == 1 and "INVALID_ARGUMENT" in result.output and "name:" in result.output
    assert on_registry(redis_url, prefix, lambda r: r.list_api_keys()) == []
