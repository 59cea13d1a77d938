"""`maas models` and `maas keys` against a real registry; `maas infer` against a real v2 worker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner, Result

from mesh.cli import app
from mesh.cli.infer import TINYLM_MAX_TOKENS, parse_input
from mesh.errors import InvalidArgument
from mesh.registry import Registry
from mesh.store import ArtifactStore
from mesh_pb import common_pb2, registry_pb2

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
    # A scope may name a model registered later, but more often it is a typo: the CLI says so.
    assert "no model named 'digits' is registered yet" in " ".join(result.output.split())
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


def _digits_sig(path: Path, inputs: bool = True) -> Path:
    path.write_text(json.dumps({
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}] if inputs else [],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
        "max_batch_size": 64,
    }))  # fmt: skip
    return path


def test_register_into_the_store_named_by_store_dir(env: Path, redis_url: str, prefix: str) -> None:
    # The default store (MAAS_STORE_DIR) is another stack's: --store-dir names the one the workers read.
    help_text = runner.invoke(app, ["models", "register", "--help"]).output
    assert "--store-dir" in help_text and "MAAS_STORE_DIR" in help_text
    artifact = env / "model.pt2"
    artifact.write_bytes(b"weights")
    other = env / "other-store"
    args = ["models", "register", "digits", "--artifact", str(artifact), "--signature"]
    result = runner.invoke(app, [*args, str(_digits_sig(env / "sig.json")), "--store-dir", str(other)])
    assert result.exit_code == 0, result.output
    assert str(other.resolve()) in result.output.replace("\n", "")
    mv = on_registry(redis_url, prefix, lambda r: r.get_version("digits", 1))
    assert ArtifactStore(other).verify(mv.artifact_uri, mv.sha256).read_bytes() == b"weights"
    assert not (env / "store" / "digits").exists()


def test_refused_registration_leaves_no_copy(
    env: Path, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifact = env / "model.pt2"
    artifact.write_bytes(b"weights")
    sig = str(_digits_sig(env / "sig.json"))
    base = ["models", "register", "digits", "--artifact", str(artifact)]
    cases = [
        (["--signature", sig, "--format", "pickle"], "format:"),
        (["--signature", sig, "--dtype", "fp64"], "dtype:"),
        (["--signature", str(_digits_sig(env / "noinputs.json", inputs=False))], "signature.inputs:"),
    ]
    for extra, field in cases:
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 1 and "INVALID_ARGUMENT" in result.output and field in result.output
    store = env / "store"
    assert not list(store.glob("digits/upload-*")), "a refused registration was copied"

    # A refusal only the registry can make (here: a stand-in for one) removes the copy it made.
    async def refuse(self: Registry, req: object) -> None:
        raise InvalidArgument("model: refused by the registry")

    monkeypatch.setattr(Registry, "register_version", refuse)
    result = runner.invoke(app, [*base, "--signature", sig])
    assert result.exit_code == 1 and "refused by the registry" in result.output
    assert not list(store.glob("digits/upload-*/*"))


def test_traffic_is_shown_as_effective_percentages(env: Path, redis_url: str, prefix: str) -> None:
    artifact = env / "model.pt2"
    artifact.write_bytes(b"weights")
    sig = str(_digits_sig(env / "sig.json"))
    for _ in range(2):
        args = ["models", "register", "digits", "--artifact", str(artifact), "--signature", sig]
        assert runner.invoke(app, args).exit_code == 0
    for v in (1, 2):
        on_registry(redis_url, prefix, lambda r, v=v: r.set_state("digits", v, common_pb2.READY))
    result = runner.invoke(app, ["models", "traffic", "digits", "1=9", "2=1"])
    assert result.exit_code == 0, result.output
    assert "digits traffic: v1 90%, v2 10%" in result.output
    assert "v1 90%, v2 10%" in runner.invoke(app, ["models", "show", "digits"]).output
    assert "v1 90%, v2 10%" in runner.invoke(app, ["models", "list"]).output
    result = runner.invoke(app, ["models", "traffic", "digits", "1=1", "2=2"])
    assert "v1 33.3%, v2 66.7%" in result.output
    assert "traffic: none" in runner.invoke(app, ["models", "traffic", "digits"]).output


def test_show_summarises_lineage_at_80_columns(env: Path, redis_url: str, prefix: str) -> None:
    artifact = env / "model.pt2"
    artifact.write_bytes(b"weights")
    args = ["models", "register", "digits", "--artifact", str(artifact), "--signature"]
    assert runner.invoke(app, [*args, str(_digits_sig(env / "sig.json"))]).exit_code == 0
    metrics = {
        "accuracy": 0.9511, "parent_accuracy": 0.9544, "size_bytes": 200_000.0, "parent_size_bytes": 800_000.0,
        "latency_ms": 0.5, "parent_latency_ms": 1.0, "parent_linear_weight_bytes": 668_672.0,
        "linear_weight_bytes": 167_168.0, "latency_batch": 64.0,
    }  # fmt: skip

    async def child(reg: Registry) -> None:
        parent = await reg.get_version("digits", 1)
        req = registry_pb2.RegisterVersionRequest(
            model="digits", artifact_uri=parent.artifact_uri, sha256=parent.sha256, format="torch_export",
            signature=parent.signature, dtype="fp32",
            lineage=common_pb2.Lineage(parent_version=1, methods=["int8_dynamic"], metrics=metrics, job_id="j"),
        )  # fmt: skip
        await reg.register_version(req)

    on_registry(redis_url, prefix, child)
    result = runner.invoke(app, ["models", "show", "digits"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    # The lineage cell wraps at 80 columns, but its figures stay whole and nothing is cut to "…".
    words = result.output.split()
    for figure in ("REGISTERED", "torch_export", "int8_dynamic", "0.951", "(-0.3", "×0.25", "×0.50"):
        assert figure in words, result.output
    assert "…" not in result.output and "parent_linear_weight_bytes" not in result.output
    shown = json.loads(runner.invoke(app, ["models", "show", "digits", "--json"]).output)
    assert shown["versions"][1]["lineage"]["metrics"] == pytest.approx(metrics)


@pytest.fixture(scope="module")
def v2_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.integration.test_worker_support import export_mlp, save_tinylm

    root = tmp_path_factory.mktemp("cli-artifacts")
    return {"mlp": export_mlp(root / "mlp.pt2"), "tinylm": save_tinylm(root / "tinylm.pt")}


@pytest.fixture
async def v2_server(tmp_path: Path, v2_artifacts: dict[str, Path]) -> AsyncIterator[str]:
    """A standalone worker serving `digits` (FP32 logits) and `tinylm` (streams BYTES) on KServe v2."""
    from tests.integration.test_worker_support import mlp_record, standalone_worker, tinylm_record

    store = ArtifactStore(tmp_path / "v2-store")
    async with standalone_worker(store) as worker:
        await worker.manager.load(mlp_record(store, v2_artifacts["mlp"], name="digits"))
        await worker.manager.load(tinylm_record(store, v2_artifacts["tinylm"]))
        yield worker.address


async def _maas(*args: str) -> Result:
    # The CLI blocks (tritonclient's sync client): it runs in a thread while the server runs on this loop.
    return await asyncio.to_thread(runner.invoke, app, list(args), env={"COLUMNS": "200"})


def _digits_reference(x: np.ndarray) -> np.ndarray:
    import torch

    from tests.integration.test_worker_support import mlp

    with torch.no_grad():
        out: np.ndarray = mlp()(torch.from_numpy(x)).numpy()
    return out


def test_parse_input_errors_are_one_line(tmp_path: Path) -> None:
    datatypes = {"pixels": "FP32", "prompt": "BYTES"}
    not_npy = tmp_path / "x.npy"
    not_npy.write_text("not numpy")
    cases = [
        (f"pixels=@{tmp_path / 'nofile.npy'}", "cannot read"),
        (f"pixels=@{not_npy}", "cannot read"),
        ("pixels=abc", "not a comma-separated list of numbers"),
        ("pixels=1,x,3", "not a comma-separated list of numbers"),
    ]
    for spec, message in cases:
        with pytest.raises(typer.BadParameter, match=message) as err:
            parse_input(spec, datatypes)
        assert str(err.value).startswith("--input pixels:")
    good = tmp_path / "good.npy"
    np.save(good, np.ones((2, 64), dtype=np.float64))
    name, arr = parse_input(f"pixels=@{good}", datatypes)
    assert name == "pixels" and arr.dtype == np.float32 and arr.shape == (2, 64)


def test_max_tokens_help_names_the_models_cap() -> None:
    from workers.models.tinylm import MAX_GENERATE_TOKENS

    assert TINYLM_MAX_TOKENS == MAX_GENERATE_TOKENS
    assert str(MAX_GENERATE_TOKENS) in runner.invoke(app, ["infer", "--help"], env={"COLUMNS": "200"}).output


async def test_infer_bad_inputs_streams_and_errors(v2_server: str, tmp_path: Path) -> None:
    for value, message in ((f"@{tmp_path / 'nofile.npy'}", "cannot read"), ("abc", "comma-separated")):
        result = await _maas("infer", "digits", "-i", f"pixels={value}", "--url", v2_server)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
        assert isinstance(result.exception, SystemExit)

    # FP32 outputs stream as the unary result shows them, not as digits run together.
    x = np.random.default_rng(0).uniform(0, 16, (1, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = await _maas(
        "infer", "digits", "-i", f"pixels=@{tmp_path / 'x.npy'}", "--stream", "--url", v2_server
    )
    assert result.exit_code == 0, result.output
    expected = np.array2string(_digits_reference(x), precision=4, threshold=40, max_line_width=100)
    assert f"logits FP32[1, 10]: {expected}" in result.output, result.output
    assert "1 responses" in result.output

    # BYTES outputs still stream as running text.
    result = await _maas("infer", "tinylm", "--text", "ab", "--max-tokens", "5", "--url", v2_server)
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()[0]) == len("ab") + 5

    # A stream error reads like every other error: CODE: message.
    result = await _maas("infer", "tinylm", "--text", "ab", "--max-tokens", "0", "--url", v2_server)
    assert result.exit_code == 1
    assert "INVALID_ARGUMENT: max_tokens: must be at least 1" in result.output, result.output
    assert "error:" not in result.output
