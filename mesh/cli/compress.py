"""`maas compress` (submit a compression job and follow it) and `maas jobs list | show | cancel`."""

from __future__ import annotations

import contextlib
import json
import os
from datetime import datetime
from typing import Annotated, Any, NoReturn

import grpc
import typer
from rich.markup import escape

from mesh.cli.common import console, err_console, run

DEFAULT_ADDRESS = "127.0.0.1:8301"
AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address", help=f"Compressor gRPC address (default: MAAS_COMPRESSOR_ADDRESS or {DEFAULT_ADDRESS})."
    ),
]

jobs_app = typer.Typer(name="jobs", help="Compression jobs: list, show, watch, cancel.", no_args_is_help=True)


def _address(address: str | None) -> str:
    return address or os.environ.get("MAAS_COMPRESSOR_ADDRESS") or DEFAULT_ADDRESS


def _stub(channel: Any) -> Any:
    from mesh_pb import compressor_pb2_grpc

    return compressor_pb2_grpc.CompressorServiceStub(channel)


def _parse_params(items: list[str]) -> tuple[dict[str, float], dict[str, str]]:
    """`--param k=v`: numbers go to params, anything else to options (e.g. student=digits_mlp:32)."""
    params: dict[str, float] = {}
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            err_console.print(f"[red]INVALID_ARGUMENT[/red]: --param {item!r}: expected key=value")
            raise typer.Exit(2)
        try:
            params[key.strip()] = float(value)
        except ValueError:
            options[key.strip()] = value.strip()
    return params, options


def _state(job: Any) -> str:
    from mesh_pb import compressor_pb2

    return str(compressor_pb2.JobState.Name(job.state)).removeprefix("JOB_")


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _print_report(job: Any) -> None:
    from rich.table import Table

    rep = job.report
    table = Table(title=f"job {job.job_id}: {_state(job)}")
    table.add_column("")
    table.add_column(f"parent {job.source.name}:{job.source.version}", justify="right")
    table.add_column(
        f"result {job.result.name}:{job.result.version}" if job.result.version else "result", justify="right"
    )
    table.add_row("accuracy", f"{rep.parent_accuracy:.4f}", f"{rep.accuracy:.4f}")
    table.add_row("artifact bytes", f"{rep.parent_size_bytes:,}", f"{rep.size_bytes:,}")
    table.add_row("parameters", f"{rep.parent_params:,}", f"{rep.params:,}")
    table.add_row(
        f"latency ms (batch {rep.latency_batch}, {rep.device})",
        f"{rep.parent_latency_ms:.3f}",
        f"{rep.latency_ms:.3f}",
    )
    console.print(table)


def _job_dict(job: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(job, preserving_proto_field_name=True)


def _unknown_keys(steps: list[Any], params: dict[str, float], options: dict[str, str]) -> str | None:
    """The first --param (or --student) no step of this job knows, with the keys that are known;
    None when every key has a step. Without this a typo (spasity=0.9) runs with the default."""
    from compressor.methods import METHODS

    specs = [METHODS.get(s.method) for s in steps]
    if any(spec is None for spec in specs):
        return None  # an unknown method: the server's error names it, which is the first thing to fix
    for key in list(params) + list(options):
        if not any(key in spec.params or key in spec.options for spec in specs if spec is not None):
            known = sorted({k for spec in specs if spec is not None for k in (*spec.params, *spec.options)})
            methods = ", ".join(s.method for s in steps)
            flag = "--student" if key == "student" and key in options else f"--param {key}"
            return (
                f"{flag}: no step of this job ({methods}) knows {key!r} (known: {', '.join(known) or 'none'})"
            )
    return None


def _finish(final: Any) -> None:
    """The final report and state; exits 1 unless the job succeeded (the result passed the gate)."""
    if final.report.latency_batch:
        _print_report(final)
    style = "green" if _state(final) == "SUCCEEDED" else "red"
    console.print(f"[{style}]{_state(final)}[/{style}] {final.message}")
    if _state(final) != "SUCCEEDED":
        raise typer.Exit(1)


def _interrupted(job_id: str) -> NoReturn:
    """Ctrl-C stops following, not the job: say so, and how to get it back or stop it."""
    err_console.print(
        f"stopped following; job [bold]{job_id}[/bold] continues on the compressor.\n"
        f"  follow it: maas jobs watch {job_id}\n  cancel it: maas jobs cancel {job_id}",
        highlight=False,
    )
    raise typer.Exit(130)


def _status_line(job: Any) -> str:
    """`RUNNING 40% (distill epoch 3/10)`: where a job is, for a job attached to or watched again."""
    line = _state(job)
    if _state(job) == "RUNNING":
        line += f" {job.progress:.0%}"
    return f"{line} ({job.stage})" if job.stage and job.stage.lower() != line.lower() else line


async def _follow(stub: Any, job: Any) -> Any:
    """Follows WatchJob with a rich progress bar; returns the final job."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from mesh_pb import compressor_pb2

    last = job
    with Progress(
        TextColumn("[bold]{task.fields[state]:<9}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=console,
    ) as bar:  # fmt: skip
        task = bar.add_task(job.stage or "queued", total=1.0, state=_state(job))
        async for event in stub.WatchJob(compressor_pb2.WatchJobRequest(job_id=job.job_id)):
            last = event.job
            bar.update(task, completed=last.progress, description=last.stage, state=_state(last))
    return last


def compress(
    model: Annotated[str, typer.Argument(help="Model to compress.")],
    method: Annotated[
        list[str],
        typer.Option(
            "--method",
            "-m",
            help="Method, repeatable and applied in order: prune_unstructured, "
            "prune_structured, distill, int8_dynamic (alias int8), int8_weight_only, int8_static, fp16, "
            "bf16, float8_weight_only, int4_weight_only, sparse_2_4.",
        ),
    ],
    max_accuracy_drop: Annotated[
        float, typer.Option(help="Largest accepted accuracy drop (0.01 = 1 point).")
    ] = 0.01,
    canary: Annotated[float, typer.Option(help="Roll the result out with this traffic percentage.")] = 0.0,
    version: Annotated[int, typer.Option(help="Version to start from; 0 = stable, else latest READY.")] = 0,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="key=value given to every step that knows it, e.g. sparsity=0.5."),
    ] = None,
    student: Annotated[
        str | None, typer.Option(help='Student of a distill step, e.g. "digits_mlp:32".')
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    job_id: Annotated[
        str,
        typer.Option(
            help="Client-chosen job id: resubmitting the same request attaches to that job (in whatever "
            "state it is); another request with a used id is refused (ALREADY_EXISTS)."
        ),
    ] = "",
    detach: Annotated[bool, typer.Option("--detach", help="Submit and return without following.")] = False,
    address: AddressOpt = None,
) -> None:
    """Submit a compression job and follow its progress; exits 1 unless the result passes the gate."""
    from compressor.methods import METHODS  # the step catalogue decides which step a --param belongs to
    from mesh.server import open_channel
    from mesh_pb import common_pb2, compressor_pb2

    params, options = _parse_params(param or [])
    if student:
        options["student"] = student
    steps = []
    for name in method:
        name = {"int8": "int8_dynamic"}.get(name, name)
        spec = METHODS.get(name)
        # Unknown methods go to the server as given, which names the bad field.
        p = {k: v for k, v in params.items() if spec is None or k in spec.params}
        o = {k: v for k, v in options.items() if spec is None or k in spec.options}
        steps.append(compressor_pb2.Step(method=name, params=p, options=o))
    unknown = _unknown_keys(steps, params, options)
    if unknown:
        err_console.print(f"[red]INVALID_ARGUMENT[/red]: {escape(unknown)}", highlight=False)
        raise typer.Exit(2)
    req = compressor_pb2.SubmitJobRequest(
        source=common_pb2.ModelRef(name=model, version=version), steps=steps, max_accuracy_drop=max_accuracy_drop,
        canary_percent=canary, device=device, job_id=job_id,
    )  # fmt: skip

    submitted: list[str] = []  # the job id, once known, for the Ctrl-C message

    async def go() -> Any:
        async with open_channel(_address(address)) as channel:
            stub = _stub(channel)
            existed = False
            if job_id:
                # A reused id attaches to the job it names (the server refuses a different request).
                with contextlib.suppress(grpc.RpcError):
                    await stub.GetJob(compressor_pb2.GetJobRequest(job_id=job_id))
                    existed = True
            job = await stub.SubmitJob(req)
            submitted.append(job.job_id)
            what = f"{model}:{job.source.version} {' → '.join(s.method for s in job.steps)}"
            if existed:
                console.print(f"job [bold]{job.job_id}[/bold] exists, {_status_line(job)}: {what}")
            else:
                console.print(f"job [bold]{job.job_id}[/bold] {_status_line(job).lower()}: {what}")
            if detach:
                return job
            console.print("following it (Ctrl-C stops following, not the job)", style="dim")
            return await _follow(stub, job)

    try:
        final = run(go)
    except KeyboardInterrupt:
        if not submitted:
            raise typer.Exit(130) from None
        _interrupted(submitted[0])
    if detach:
        return
    _finish(final)


@jobs_app.command("list")
def list_jobs(
    limit: Annotated[int, typer.Option(help="At most this many jobs.")] = 50,
    address: AddressOpt = None,
) -> None:
    """Jobs, newest first."""
    from rich.table import Table

    from mesh.server import open_channel
    from mesh_pb import compressor_pb2

    async def go() -> Any:
        async with open_channel(_address(address)) as channel:
            return await _stub(channel).ListJobs(compressor_pb2.ListJobsRequest(limit=limit))

    resp = run(go)
    table = Table()
    # The id is what the other commands take, so it is never cut; the other columns wrap.
    width = max((len(job.job_id) for job in resp.jobs), default=3)
    table.add_column("job", no_wrap=True, min_width=width)
    for col in ("state", "source", "methods", "result", "progress", "created"):
        table.add_column(col, overflow="fold")
    for job in resp.jobs:
        table.add_row(
            job.job_id, _state(job), f"{job.source.name}:{job.source.version}",
            " → ".join(s.method for s in job.steps), f"{job.result.version or '-'}", f"{job.progress:.0%}",
            _when(job.created_ms),
        )  # fmt: skip
    console.print(table)


@jobs_app.command("show")
def show_job(
    job_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job record as JSON.")] = False,
    address: AddressOpt = None,
) -> None:
    """One job with its evaluation report."""
    from mesh.server import open_channel
    from mesh_pb import compressor_pb2

    async def go() -> Any:
        async with open_channel(_address(address)) as channel:
            return await _stub(channel).GetJob(compressor_pb2.GetJobRequest(job_id=job_id))

    job = run(go)
    if as_json:
        console.print_json(json.dumps(_job_dict(job)))
        return
    console.print(
        f"job [bold]{job.job_id}[/bold]: {_state(job)} ({job.progress:.0%}, {job.stage}) "
        f"attempts {job.attempts}, device {job.device}"
    )
    for i, s in enumerate(job.steps):
        details = ", ".join(
            [f"{k}={v:g}" for k, v in sorted(s.params.items())]
            + [f"{k}={v}" for k, v in sorted(s.options.items())]
        )
        console.print(f"  steps[{i}] {s.method} {details}")
    if job.report.latency_batch:
        _print_report(job)
    if job.message:
        console.print(job.message)


@jobs_app.command("watch")
def watch_job(job_id: str, address: AddressOpt = None) -> None:
    """Follow a job again (after --detach or Ctrl-C) until it ends; exits 1 unless it succeeds."""
    from mesh.server import open_channel
    from mesh_pb import compressor_pb2

    async def go() -> Any:
        async with open_channel(_address(address)) as channel:
            stub = _stub(channel)
            job = await stub.GetJob(compressor_pb2.GetJobRequest(job_id=job_id))
            console.print(
                f"job [bold]{job.job_id}[/bold] {_status_line(job)} (Ctrl-C stops watching, not the job)"
            )
            return await _follow(stub, job)

    try:
        final = run(go)
    except KeyboardInterrupt:
        _interrupted(job_id)
    _finish(final)


@jobs_app.command("cancel")
def cancel_job(job_id: str, address: AddressOpt = None) -> None:
    """Cancel a queued or running job."""
    from mesh.server import open_channel
    from mesh_pb import compressor_pb2

    async def go() -> Any:
        async with open_channel(_address(address)) as channel:
            return await _stub(channel).CancelJob(compressor_pb2.CancelJobRequest(job_id=job_id))

    job = run(go)
    console.print(f"job {job.job_id}: {_state(job)} ({job.stage})")


def register(root: typer.Typer) -> None:
    """Adds `compress` and the `jobs` sub-app to the root `maas` app."""
    root.command("compress")(compress)
    root.add_typer(jobs_app, name="jobs")
