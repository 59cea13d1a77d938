"""`maas infer`: one inference request to the gateway (or any KServe v2 server) with tritonclient."""

from __future__ import annotations

import queue
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.markup import escape

from mesh.cli.common import err_console
from mesh.codec import DATATYPES

if TYPE_CHECKING:
    from rich.console import Console

DEFAULT_URL = "127.0.0.1:8001"
# workers.models.tinylm.MAX_GENERATE_TOKENS, copied because importing it loads torch into every `maas`
# start; tests/integration/test_cli.py keeps the two equal.
TINYLM_MAX_TOKENS = 2048

app = typer.Typer(help="Send one inference request with tritonclient.")

# v2 datatype -> numpy dtype (BF16 as float32, BYTES as object), as the codec reads the wire.
_NUMPY = DATATYPES


def _shape(declared: list[int], batch: int) -> list[int]:
    """The declared shape with -1 dims filled: the first by the batch size, others by 1."""
    out = []
    for i, dim in enumerate(declared):
        out.append(int(dim) if dim >= 0 else (batch if i == 0 else 1))
    return out or [1]


def random_tensor(name: str, datatype: str, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    """Plausible random data for a declared input (pixel-like values for FP32, token ids for ints)."""
    if datatype == "BYTES":
        return np.array(["Once upon a time"] * int(np.prod(shape)), dtype=np.object_).reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(np.bool_)
    dtype = _NUMPY.get(datatype)
    if dtype is None:
        raise typer.BadParameter(f"input {name}: cannot generate random {datatype} data")
    if np.issubdtype(dtype, np.floating):
        return rng.integers(0, 17, shape).astype(dtype)
    if datatype == "INT32" and "token" in name:
        return np.full(shape, 32, dtype=dtype)
    return rng.integers(0, 1000, shape).astype(dtype)


def parse_input(spec: str, datatypes: dict[str, str]) -> tuple[str, np.ndarray]:
    """NAME=@file.npy | NAME=1,2,3 (a [1, n] row) | NAME=text (BYTES inputs)."""
    if "=" not in spec:
        raise typer.BadParameter(f"--input {spec!r}: expected NAME=@file.npy or NAME=v1,v2,...")
    name, value = spec.split("=", 1)
    datatype = datatypes.get(name)
    if datatype is None:
        raise typer.BadParameter(
            f"--input {name}: the model has no input {name!r} (inputs: {sorted(datatypes)})"
        )
    if value.startswith("@"):
        try:
            array = np.load(Path(value[1:]), allow_pickle=False)
        except (OSError, ValueError) as exc:  # missing, unreadable, not .npy, or pickled objects
            raise typer.BadParameter(
                f"--input {name}: cannot read {value[1:]!r} as a .npy array: {exc}"
            ) from None
    elif datatype == "BYTES":
        array = np.array([value], dtype=np.object_)
    else:
        try:
            array = np.array([[float(v) for v in value.split(",") if v.strip()]])
        except ValueError:
            raise typer.BadParameter(
                f"--input {name}: {value!r} is not a comma-separated list of numbers (or use @file.npy)"
            ) from None
    if datatype != "BYTES":
        try:
            array = array.astype(_NUMPY[datatype])
        except (TypeError, ValueError) as exc:
            raise typer.BadParameter(
                f"--input {name}: cannot convert {array.dtype} data to {datatype}: {exc}"
            ) from None
    return name, array


def _values(arr: np.ndarray) -> str:
    """An output's values as the result table shows them (text for BYTES, rounded numbers otherwise)."""
    if arr.dtype == np.object_:
        return ", ".join(
            v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in arr.ravel()[:8]
        )
    return np.array2string(arr, precision=4, threshold=40, max_line_width=100)


def _error_line(exc: Any) -> str:
    """`CODE: message`, as every other maas command prints an error (tritonclient's str() does not)."""
    status = str(exc.status() or "ERROR").removeprefix("StatusCode.")
    return f"[red]{status}[/red]: {escape(exc.message() or str(exc))}"


def _show_outputs(
    console: Console, outputs: dict[str, np.ndarray], elapsed_ms: float, model: str, version: str
) -> None:
    from rich.table import Table

    table = Table(title=f"{model} (version {version or '-'}) in {elapsed_ms:.1f} ms")
    for col in ("output", "datatype", "shape", "values"):
        table.add_column(col)
    for name, arr in outputs.items():
        table.add_row(name, str(arr.dtype), str(list(arr.shape)), _values(arr))
    console.print(table)
    for name, arr in outputs.items():
        if (
            arr.ndim == 2
            and arr.dtype.kind == "f"
            and arr.shape[1] <= 1000
            and name in ("logits", "scores", "probs")
        ):
            console.print(f"{name} argmax: {arr.argmax(axis=1).tolist()}")


def _stream(
    client: Any,
    grpcclient: Any,
    model: str,
    version: str,
    inputs: list[Any],
    headers: dict[str, str] | None,
    console: Console,
    timeout_s: float,
    prompt: str = "",
) -> None:
    """ModelStreamInfer: prints BYTES outputs as running text as they arrive, every other output
    on its own line as the unary result shows it, until the final response."""
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    # triton_grpc_error: a failed request ends the stream with its status code (INVALID_ARGUMENT, ...)
    # instead of an error_message response that carries no code, so errors read as in the unary path.
    stream_headers = {**(headers or {}), "triton_grpc_error": "true"}
    client.start_stream(callback=lambda result, error: responses.put((result, error)), headers=stream_headers)
    t0 = time.perf_counter()
    first_ms = None
    count = 0
    mid_line = False  # streamed text was printed without a newline yet
    for tensor in inputs:
        if tensor.datatype() == "BYTES" and prompt:
            console.print(prompt, end="", style="dim", markup=False, highlight=False, soft_wrap=True)
            mid_line = True
            break
    try:
        client.async_stream_infer(
            model, inputs, model_version=version, request_id="maas-infer", enable_empty_final_response=True
        )
        while True:
            try:
                result, error = responses.get(timeout=timeout_s)
            except queue.Empty:
                raise typer.BadParameter(f"no stream response within {timeout_s:.0f} s") from None
            if error is not None:
                if mid_line:
                    console.print()
                err_console.print(_error_line(error), highlight=False)
                raise typer.Exit(1)
            response = result.get_response()
            final = response.parameters.get("triton_final_response")
            if response.outputs:
                count += 1
                if first_ms is None:
                    first_ms = (time.perf_counter() - t0) * 1000
                for out in response.outputs:
                    arr = result.as_numpy(out.name)
                    if arr is None:
                        continue
                    if out.datatype == "BYTES":
                        for item in arr.ravel():
                            text = item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
                            console.print(text, end="", markup=False, highlight=False, soft_wrap=True)
                            mid_line = True
                        continue
                    if mid_line:
                        console.print()
                        mid_line = False
                    console.print(
                        f"{out.name} {out.datatype}{list(arr.shape)}: {_values(arr)}",
                        markup=False,
                        highlight=False,
                    )
            if final is not None and final.bool_param:
                break
    finally:
        client.stop_stream()
    total_ms = (time.perf_counter() - t0) * 1000
    if mid_line:
        console.print()
    console.print(
        f"[dim]{count} responses, first after {first_ms or 0:.1f} ms, total {total_ms:.1f} ms[/dim]",
        highlight=False,
    )


def infer(
    model: Annotated[str, typer.Argument(help="Model name, e.g. digits, tinylm, encoder.")],
    random: Annotated[bool, typer.Option("--random", help="Random data for every required input.")] = False,
    inputs: Annotated[
        list[str], typer.Option("--input", "-i", help="NAME=@file.npy, NAME=1,2,3 or NAME=text (repeat).")
    ] = [],  # noqa: B006 - typer reads the default
    text: Annotated[
        str | None, typer.Option("--text", help="Text for the model's BYTES input (prompt).")
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-tokens",
            help=f"tinylm: characters to generate (at least 1; the model caps larger values at "
            f"{TINYLM_MAX_TOKENS}).",
        ),
    ] = None,
    stream: Annotated[
        bool, typer.Option("--stream", help="ModelStreamInfer (decoupled models stream).")
    ] = False,
    batch: Annotated[int, typer.Option("--batch", help="Batch size for --random.")] = 1,
    version: Annotated[
        str, typer.Option("--version", "-v", help="Version, alias, or empty for the default.")
    ] = "",
    token: Annotated[
        str | None, typer.Option("--token", envvar="MAAS_TOKEN", help="API key (bearer token).")
    ] = None,
    url: Annotated[
        str, typer.Option("--url", envvar="MAAS_URL", help="host:port of the v2 gRPC endpoint.")
    ] = DEFAULT_URL,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds before giving up.")] = 30.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of --random.")] = 0,
) -> None:
    """Send one request: `maas infer digits --random`, `maas infer tinylm --text "Once upon" --stream`."""
    import tritonclient.grpc as grpcclient
    from rich.console import Console
    from tritonclient.utils import InferenceServerException

    console = Console()
    headers = {"authorization": f"Bearer {token}"} if token else None
    client = grpcclient.InferenceServerClient(url)
    try:
        meta = client.get_model_metadata(
            model, model_version=version, headers=headers, client_timeout=timeout
        )
        try:
            config = client.get_model_config(
                model, model_version=version, headers=headers, client_timeout=timeout
            )
            decoupled = bool(config.config.model_transaction_policy.decoupled)
        except InferenceServerException:
            decoupled = False
        declared = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
        datatypes = {name: dt for name, (dt, _) in declared.items()}
        arrays: dict[str, np.ndarray] = {}
        for spec in inputs:
            name, arr = parse_input(spec, datatypes)
            arrays[name] = arr
        if text is not None:
            text_input = next((n for n, dt in datatypes.items() if dt == "BYTES" and n not in arrays), None)
            if text_input is None:
                raise typer.BadParameter(f"--text: {model} has no free BYTES input")
            arrays[text_input] = np.array([text], dtype=np.object_)
        if max_tokens is not None:
            name = "max_tokens" if "max_tokens" in datatypes else ""
            if not name:
                raise typer.BadParameter(f"--max-tokens: {model} has no max_tokens input")
            arrays[name] = np.array([max_tokens], dtype=_NUMPY[datatypes[name]])
        if random:
            rng = np.random.default_rng(seed)
            for name, (dt, shape) in declared.items():
                # Optional scalar knobs (max_tokens) keep the model's default unless given.
                if name not in arrays and name != "max_tokens":
                    arrays[name] = random_tensor(name, dt, _shape(shape, batch), rng)
        missing = [n for n in declared if n not in arrays and n != "max_tokens"]
        if missing:
            raise typer.BadParameter(
                f"inputs {missing} are missing: use --random, --text or --input NAME=..."
            )
        infer_inputs = []
        for name, arr in arrays.items():
            tensor = grpcclient.InferInput(name, list(arr.shape), datatypes[name])
            tensor.set_data_from_numpy(arr)
            infer_inputs.append(tensor)
        if stream or decoupled:
            _stream(
                client, grpcclient, model, version, infer_inputs, headers, console, timeout, prompt=text or ""
            )
            return
        t0 = time.perf_counter()
        result = client.infer(
            model, infer_inputs, model_version=version, headers=headers, client_timeout=timeout
        )
        elapsed_ms = (time.perf_counter() - t0) * 1000
        response = result.get_response()
        outputs = {out.name: result.as_numpy(out.name) for out in response.outputs}
        _show_outputs(console, outputs, elapsed_ms, response.model_name, response.model_version)
    except InferenceServerException as exc:
        err_console.print(_error_line(exc), highlight=False)
        raise typer.Exit(1) from None
    finally:
        client.close()


app.command("infer")(infer)


def register(root: typer.Typer) -> None:
    """Adds `maas infer` to the root app."""
    root.command("infer")(infer)
