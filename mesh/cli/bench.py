"""`maas bench`: closed-loop load (tritonclient aio) against the gateway, a worker, a bare echo; reports."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from mesh.benchtools.loadgen import PointSummary
    from mesh.benchtools.report import Report

app = typer.Typer(
    help="Closed-loop benchmarks: direct to a worker, through the gateway, a bare echo, dynamic batching.",
    no_args_is_help=True,
)

ConcurrencyOpt = Annotated[
    str, typer.Option("--concurrency", "-c", help="Comma-separated concurrency sweep.")
]
DurationOpt = Annotated[float, typer.Option("--duration", help="Measured seconds per point.")]
WarmupOpt = Annotated[float, typer.Option("--warmup", help="Unmeasured seconds before each point.")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Write the run into this markdown file.")]
RunsOpt = Annotated[
    int, typer.Option("--runs", help="Runs per point (interleaved across scenarios); the median is reported.")
]
TokenOpt = Annotated[
    str | None, typer.Option("--token", envvar="MAAS_TOKEN", help="API key for the gateway.")
]


def register(root: typer.Typer) -> None:
    """Adds `maas bench ...` to the root app."""
    root.add_typer(app, name="bench")


def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"--concurrency: {text!r} is not a list of integers") from None
    if not values or min(values) < 1:
        raise typer.BadParameter("--concurrency: give positive integers, e.g. 1,4,16")
    return values


def _console() -> Console:
    from rich.console import Console

    return Console(highlight=False)


def _point_printer(console: Console, label: str) -> Callable[[PointSummary], None]:
    def show(r: PointSummary) -> None:
        errors = f", [red]{r.errors} errors[/red] ({r.first_error[:80]})" if r.errors else ""
        cpu = "  cpu ms/req " + " ".join(f"{k} {v:.2f}" for k, v in r.cpu_ms.items()) if r.cpu_ms else ""
        console.print(
            f"  {label:<26} c={r.concurrency:<4} {r.rps:>8,.0f} req/s  p50 {r.p50_ms:6.2f} ms  "
            f"p99 {r.p99_ms:7.2f} ms{errors}{cpu}"
        )

    return show


def _point(
    url: str,
    workload_name: str,
    concurrency: int,
    duration: float,
    warmup: float,
    *,
    model: str = "",
    version: str = "",
    token: str | None = None,
    pids: dict[str, int] | None = None,
    label: str = "",
    console: Console | None = None,
) -> PointSummary:
    """One run of one point, measured by a load-generator process of its own."""
    from mesh.benchtools.loadgen import run_point

    r = run_point(
        url,
        workload_name,
        concurrency,
        duration_s=duration,
        warmup_s=warmup,
        model=model,
        version=version,
        token=token,
        pids=pids,
    )
    if console is not None:
        _point_printer(console, label or f"{workload_name} @ {url}")(r)
    return r


def _sweep(
    url: str,
    workload_name: str,
    concurrencies: list[int],
    duration: float,
    warmup: float,
    *,
    runs: int = 1,
    model: str = "",
    version: str = "",
    token: str | None = None,
    pids: dict[str, int] | None = None,
    label: str = "",
    console: Console | None = None,
) -> list[PointSummary]:
    """Each concurrency `runs` times (separate load-generator processes); the median of each point."""
    from mesh.benchtools.loadgen import PointSummary

    out = []
    for c in concurrencies:
        points = [
            _point(
                url,
                workload_name,
                c,
                duration,
                warmup,
                model=model,
                version=version,
                token=token,
                pids=pids,
                label=label,
                console=console,
            )
            for _ in range(max(1, runs))
        ]
        out.append(PointSummary.median_of(points))
    return out


def _uvloop() -> None:
    from mesh.server import install_uvloop

    install_uvloop()


def _finish(report: Report, out: Path | None, console: Console) -> None:
    console.print(report.markdown(), markup=False, soft_wrap=True)
    if out is not None:
        report.write(out)
        console.print(f"[green]written to {out}[/green]")


def _command_line() -> str:
    args = " ".join(sys.argv[1:])
    if sys.argv[0].endswith("__main__.py"):
        return f"python -m mesh.cli {args}"
    return f"maas {args}"


@app.command()
def echo(
    concurrency: ConcurrencyOpt = "1,16",
    duration: DurationOpt = 3.0,
    warmup: WarmupOpt = 0.5,
    runs: RunsOpt = 3,
    out: OutOpt = None,
) -> None:
    """The floor: a bare grpc.aio v2 server (no interceptors, no model) that echoes its input."""
    from mesh.benchtools import procs
    from mesh.benchtools.report import Report

    _uvloop()
    console = _console()
    report = Report(command=_command_line(), runs_per_point=runs)
    with tempfile.TemporaryDirectory(prefix="maas-bench-") as tmp:
        sink = procs.FileSink(Path(tmp) / "echo.log")
        child = procs.start_echo(sink)
        try:
            for r in _sweep(
                child.address,
                "echo",
                _concurrencies(concurrency),
                duration,
                warmup,
                runs=runs,
                pids={"echo": child.pid},
                console=console,
            ):
                report.add("echo", "bare grpc.aio echo", "echo", r)
        finally:
            procs.stop(child)
            sink.close()
    _finish(report, out, console)


def _sweep_command(
    scenario: str,
    target: str,
    url: str,
    model: str,
    version: str,
    concurrency: str,
    duration: float,
    warmup: float,
    runs: int,
    token: str | None,
    out: Path | None,
) -> None:
    """The body of the single-target commands: a concurrency sweep against one endpoint, reported."""
    from mesh.benchtools.report import Report

    _uvloop()
    console = _console()
    report = Report(command=_command_line(), runs_per_point=runs)
    for r in _sweep(
        url,
        model,
        _concurrencies(concurrency),
        duration,
        warmup,
        runs=runs,
        version=version,
        token=token,
        console=console,
    ):
        report.add(scenario, target, model, r)
    _finish(report, out, console)


@app.command()
def direct(
    url: Annotated[str, typer.Option("--url", help="host:port of a worker (its v2 server).")],
    model: Annotated[str, typer.Option("--model", help="digits or encoder.")] = "digits",
    version: Annotated[str, typer.Option("--version", help="Version to call; empty = newest loaded.")] = "",
    concurrency: ConcurrencyOpt = "1,4,16",
    duration: DurationOpt = 3.0,
    warmup: WarmupOpt = 0.5,
    runs: RunsOpt = 3,
    out: OutOpt = None,
) -> None:
    """Straight to one worker, bypassing the gateway."""
    _sweep_command(
        "direct", f"worker {url}", url, model, version, concurrency, duration, warmup, runs, None, out
    )


@app.command()
def gateway(
    url: Annotated[
        str, typer.Option("--url", envvar="MAAS_URL", help="host:port of the gateway.")
    ] = "127.0.0.1:8001",
    model: Annotated[str, typer.Option("--model", help="digits or encoder.")] = "digits",
    version: Annotated[
        str, typer.Option("--version", help="Version or alias; empty = the model's default.")
    ] = "",
    concurrency: ConcurrencyOpt = "1,4,16",
    duration: DurationOpt = 3.0,
    warmup: WarmupOpt = 0.5,
    runs: RunsOpt = 3,
    token: TokenOpt = None,
    out: OutOpt = None,
) -> None:
    """Through the mesh: client → gateway → worker."""
    _sweep_command(
        "gateway", f"gateway {url}", url, model, version, concurrency, duration, warmup, runs, token, out
    )


def run_batching(
    report: Report,
    console: Console,
    concurrency: int,
    duration: float,
    warmup: float,
    workdir: Path,
    runs: int = 1,
) -> None:
    """encoder small at `concurrency` on a standalone worker: version 1 batches, version 2 does not;
    then the same model in-process at batch 1 and batch 32 (the most batching can give on this device)."""
    from mesh.benchtools import procs
    from mesh.benchtools.batching import (
        BATCHING_OFF,
        BATCHING_ON,
        build_encoder_versions,
        inprocess_ceiling,
        load_versions_sync,
    )
    from mesh.benchtools.loadgen import PointSummary

    store = workdir / "bench-store"
    console.print("batching: exporting encoder small (random weights)…")
    on, off = build_encoder_versions(store)
    sink = procs.FileSink(workdir / "batching-worker.log")
    child = procs.start_standalone_worker(sink, store)
    labels = {BATCHING_ON: "dynamic batching on", BATCHING_OFF: "dynamic batching off"}
    points: dict[int, list[PointSummary]] = {BATCHING_ON: [], BATCHING_OFF: []}
    try:
        load_versions_sync(child.address, [on, off])
        for _ in range(max(1, runs)):
            for number, label in labels.items():
                points[number].append(
                    _point(
                        child.address,
                        "encoder",
                        concurrency,
                        duration,
                        warmup,
                        version=str(number),
                        pids={"worker": child.pid},
                        label=f"encoder small, {label}",
                        console=console,
                    )
                )
    finally:
        procs.stop(child)
        sink.close()
    for number, label in labels.items():
        delay = f", max delay {on.batching.max_queue_delay_us} µs" if number == BATCHING_ON else ""
        report.add(
            "batching",
            "worker (standalone)",
            "encoder small",
            PointSummary.median_of(points[number]),
            note=f"{label}{delay}, max batch 64",
        )
    console.print("batching: encoder small in-process at batch 1 and batch 32 (1 torch thread)…")
    report.ceiling = inprocess_ceiling(store, on)
    one, many = report.ceiling
    console.print(f"  {one:.2f} ms/sequence at batch 1, {many:.2f} at batch 32: {one / many:.2f}×")


@app.command()
def batching(
    concurrency: Annotated[int, typer.Option("--concurrency", "-c")] = 32,
    duration: DurationOpt = 6.0,
    warmup: WarmupOpt = 3.0,
    runs: RunsOpt = 1,
    out: OutOpt = None,
) -> None:
    """encoder small at concurrency 32 on one worker, dynamic batching on vs off."""
    from mesh.benchtools.report import Report

    _uvloop()
    console = _console()
    report = Report(command=_command_line(), runs_per_point=runs)
    with tempfile.TemporaryDirectory(prefix="maas-bench-") as tmp:
        run_batching(report, console, concurrency, duration, warmup, Path(tmp), runs)
    add_verdicts(report)
    _finish(report, out, console)


def add_verdicts(report: Report) -> None:
    """The issue's targets, judged on the rows of this run."""
    from mesh.benchtools.report import Verdict

    echo1 = report.find("echo", 1)
    direct1 = report.find("direct", 1)
    gateway1 = report.find("gateway", 1)
    direct16 = report.find("direct", 16)
    gateway16 = report.find("gateway", 16)
    if direct1 is not None and gateway1 is not None:
        added = gateway1.p50_ms - direct1.p50_ms
        floor = ""
        if echo1 is not None:
            hops = [
                f"{mode} +{p.p50_ms - echo1.p50_ms:.2f} ms"
                for mode in ("stream", "unary")
                if (p := report.find(f"proxy-{mode}", 1)) is not None
            ]
            if hops:
                floor = "; a bare proxy in front of the echo, same run: " + ", ".join(hops)
        report.verdicts.append(
            Verdict(
                "gateway hop, digits c=1",
                "≤ 0.5 ms added to p50 vs direct",
                f"+{added:.2f} ms ({gateway1.p50_ms:.2f} vs {direct1.p50_ms:.2f}){floor}",
                added <= 0.5,
            )
        )
    perf_p50 = {(target, c): p50 for target, _model, c, _rps, p50, _p99 in report.perf_rows}
    if ("worker", 1) in perf_p50 and ("gateway", 1) in perf_p50:
        added = perf_p50[("gateway", 1)] - perf_p50[("worker", 1)]
        report.verdicts.append(
            Verdict(
                "gateway hop, digits c=1, perf_analyzer",
                "≤ 0.5 ms added to p50 vs direct",
                f"+{added:.2f} ms ({perf_p50[('gateway', 1)]:.2f} vs {perf_p50[('worker', 1)]:.2f}); "
                f"Triton's C++ client, median of {report.perf_runs} runs",
                added <= 0.5,
            )
        )
    perf_rps = {(target, c): rps for target, _model, c, rps, _p50, _p99 in report.perf_rows}
    if perf_rps.get(("worker", 16)) and ("gateway", 16) in perf_rps:
        ratio = perf_rps[("gateway", 16)] / perf_rps[("worker", 16)]
        report.verdicts.append(
            Verdict(
                "mesh throughput, digits c=16, perf_analyzer",
                "≥ 80% of direct",
                f"{ratio:.0%} ({perf_rps[('gateway', 16)]:,.0f} vs {perf_rps[('worker', 16)]:,.0f} req/s); "
                f"Triton's C++ client, median of {report.perf_runs} runs",
                ratio >= 0.8,
            )
        )
    if direct16 is not None and gateway16 is not None and direct16.rps > 0:
        ratio = gateway16.rps / direct16.rps
        report.verdicts.append(
            Verdict(
                "mesh throughput, digits c=16",
                "≥ 80% of direct",
                f"{ratio:.0%} ({gateway16.rps:,.0f} vs {direct16.rps:,.0f} req/s)",
                ratio >= 0.8,
            )
        )
    if echo1 is not None and direct1 is not None:
        gap = direct1.p50_ms - echo1.p50_ms
        report.verdicts.append(
            Verdict(
                "worker vs bare echo, digits c=1",
                "p50 within 0.3 ms of echo",
                f"+{gap:.2f} ms ({direct1.p50_ms:.2f} vs {echo1.p50_ms:.2f})",
                gap <= 0.3,
            )
        )
    batch = [row.result for row in report.rows if row.scenario == "batching"]
    if len(batch) == 2 and (batch[0].requests == 0 or batch[1].requests == 0):
        report.verdicts.append(
            Verdict(
                f"dynamic batching, encoder small c={batch[0].concurrency}",
                "≥ 3× batching off",
                "no request completed inside the measured window (raise --duration/--warmup)",
                None,
            )
        )
    elif len(batch) == 2:
        ratio = batch[0].rps / batch[1].rps
        report.verdicts.append(
            Verdict(
                f"dynamic batching, encoder small c={batch[0].concurrency}",
                "≥ 3× batching off",
                f"{ratio:.1f}× ({batch[0].rps:,.0f} vs {batch[1].rps:,.0f} req/s)"
                + (
                    f"; in-process ceiling on this device {report.ceiling[0] / report.ceiling[1]:.2f}× "
                    "(per-sequence cost at batch 1 vs batch 32)"
                    if report.ceiling is not None
                    else ""
                ),
                ratio >= 3.0,
            )
        )


def run_perf_analyzer(
    report: Report, console: Console, targets: list[tuple[str, str]], binary: Path, runs: int = 3
) -> None:
    """perf_analyzer on digits at c=1 and c=16 for each (label, url): `runs` rounds, the targets
    interleaved in each, and the median of each figure per point (one run is at the mercy of a noisy
    moment on a shared machine)."""
    from statistics import median

    from mesh.benchtools.perf import run_perf_analyzer as run_pa

    seen: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    commands: dict[str, str] = {}
    for round_ in range(max(1, runs)):
        for label, url in targets:
            console.print(f"perf_analyzer: {label} ({url}), run {round_ + 1} of {runs}…")
            try:
                rows, command = run_pa(url, "digits", "pixels:64", "1:16:15", binary=binary)
            except Exception as exc:
                report.notes.append(f"perf_analyzer against {label} failed: {exc}")
                console.print(f"  [yellow]{exc}[/yellow]")
                continue
            commands.setdefault(label, command.replace(url, f"<{label}>"))
            for row in sorted(rows, key=lambda r: r.concurrency):
                seen.setdefault((label, row.concurrency), []).append((row.rps, row.p50_ms, row.p99_ms))
                console.print(
                    f"  c={row.concurrency:<3} {row.rps:>8,.0f} req/s  p50 {row.p50_ms:.2f} ms  "
                    f"p99 {row.p99_ms:.2f} ms"
                )
    report.perf_commands.extend(commands.values())
    report.perf_runs = max(1, runs)
    for (label, c), points in seen.items():
        rps, p50, p99 = (median(p[i] for p in points) for i in range(3))
        report.perf_rows.append((label, "digits", c, rps, p50, p99))


def run_compressor_bench(report: Report, console: Console, timeout_s: float = 600.0) -> None:
    """Adds `python -m compressor.bench`'s markdown output when the compressor ships one."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("compressor.bench") is None:
        report.notes.append("compressor figures: `python -m compressor.bench` is not available in this tree")
        return
    console.print("compressor: python -m compressor.bench …")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "compressor.bench"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        report.notes.append(f"compressor figures: `python -m compressor.bench` ran over {timeout_s:.0f} s")
        return
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        report.notes.append(
            f"compressor figures: `python -m compressor.bench` failed (rc {proc.returncode}): {tail}"
        )
        return
    report.extra_sections.append("### Compressor (`python -m compressor.bench`)\n\n" + proc.stdout.strip())


@app.command("all")
def all_(
    out: Annotated[Path, typer.Option("--out", help="Markdown file the run is written into.")] = Path(
        "docs/benchmarks.md"
    ),
    url: Annotated[
        str | None, typer.Option("--url", help="Benchmark this running gateway instead of a private stack.")
    ] = None,
    direct_url: Annotated[
        str | None,
        typer.Option("--direct-url", help="With --url: a worker of that stack for the direct rows."),
    ] = None,
    concurrency: ConcurrencyOpt = "1,4,16",
    duration: DurationOpt = 3.0,
    warmup: WarmupOpt = 0.5,
    runs: RunsOpt = 3,
    batching_concurrency: Annotated[int, typer.Option("--batching-concurrency")] = 32,
    perf: Annotated[
        bool, typer.Option("--perf/--no-perf", help="Add perf_analyzer rows when .tools has it.")
    ] = True,
    compressor: Annotated[
        bool, typer.Option("--compressor/--no-compressor", help="Include python -m compressor.bench.")
    ] = True,
    token: TokenOpt = None,
    keep: Annotated[
        bool,
        typer.Option(
            "--keep", help="Keep the private stack's directory and logs (kept anyway when a request failed)."
        ),
    ] = False,
) -> None:
    """Every scenario on a private stack (free ports, own Redis and store); writes docs/benchmarks.md."""
    from mesh.benchtools import perf as perf_mod
    from mesh.benchtools import procs
    from mesh.benchtools.report import Report
    from mesh.up import Stack, StackConfig

    _uvloop()
    console = _console()
    sweep_c = _concurrencies(concurrency)
    report = Report(command=_command_line(), runs_per_point=runs)
    # Short path: the embedded Redis listens on a unix socket under it (~107 bytes at most).
    workdir = Path(tempfile.mkdtemp(prefix="maas-bench-", dir="/tmp" if Path("/tmp").is_dir() else None))
    sink = procs.FileSink(workdir / "stack.log")
    stack: Stack | None = None
    echo_child = None
    started = time.monotonic()
    try:
        if url is None:
            console.print(f"starting a private stack in {workdir} (logs: {sink.path})…")
            stack = Stack(
                StackConfig(
                    workers=1,
                    demo=True,
                    demo_models=("digits",),
                    # Accuracy is not what is measured here; fewer epochs start the stack sooner.
                    digits_epochs=10,
                    ephemeral=True,
                    compressor=False,
                    var_dir=workdir / "var",
                    key_prefix="bench",
                ),
                console=console,
                sink=sink,
            )
            stack.start()
            gateway_url = stack.gateway.address if stack.gateway else ""
            worker_url: str | None = stack.workers[0].address
            console.print(
                f"stack up in {time.monotonic() - started:.0f} s: gateway {gateway_url}, worker {worker_url}"
            )
        else:
            gateway_url, worker_url = url, direct_url
        echo_child = procs.start_echo(sink)
        pids: dict[str, int] = {}
        unary: tuple[str, dict[str, int]] | None = None
        if stack is not None:
            pids = {"worker": stack.workers[0].pid}
            if stack.gateway is not None:
                pids["gateway"] = stack.gateway.pid
                # A second gateway that makes one v2 ModelInfer call per request (the multiplexed
                # stream off): what the stream saves, measured side by side.
                second = stack.spawn_gateway({"MAAS_GATEWAY_UPSTREAM": "unary"})
                unary = (second.address, {"gateway": second.pid, "worker": stack.workers[0].pid})
        # (scenario, target label, url, workload, processes whose CPU is counted) per concurrency.
        from mesh.benchtools.loadgen import PointSummary

        # The floor of one hop: bare proxies (no validation, routing or metrics) in front of the echo.
        proxies = [
            procs.start_echo(sink, proxy=echo_child.address, upstream=mode) for mode in ("stream", "unary")
        ]
        for c in sweep_c:
            scenarios: list[tuple[str, str, str, str, dict[str, int]]] = []
            if c in (1, max(sweep_c)):
                scenarios.append(
                    ("echo", "bare grpc.aio echo", echo_child.address, "echo", {"echo": echo_child.pid})
                )
            if c == 1:
                for proxy, mode, how in zip(
                    proxies, ("stream", "unary"), ("multiplexed stream", "one call per request"), strict=True
                ):
                    scenarios.append(
                        (
                            f"proxy-{mode}",
                            f"bare proxy → echo, {how}",
                            proxy.address,
                            "echo",
                            {"gateway": proxy.pid, "echo": echo_child.pid},
                        )
                    )
            if worker_url:
                scenarios.append(
                    ("direct", "worker", worker_url, "digits", {"worker": pids["worker"]} if pids else {})
                )
            scenarios.append(("gateway", "gateway → worker", gateway_url, "digits", pids))
            if unary is not None and c in (1, max(sweep_c)):
                scenarios.append(
                    (
                        "gateway-unary",
                        "gateway → worker, one v2 call per request",
                        unary[0],
                        "digits",
                        unary[1],
                    )
                )
            points: dict[str, list[PointSummary]] = {name: [] for name, *_ in scenarios}
            # Runs interleaved (echo, direct, gateway, echo, ...) so that a burst of other work on the
            # machine lands on every scenario alike; the median of each point is reported.
            for _ in range(max(1, runs)):
                for name, _target, address, workload, own in scenarios:
                    points[name].append(
                        _point(
                            address,
                            workload,
                            c,
                            duration,
                            warmup,
                            token=token if name.startswith("gateway") else None,
                            pids=own,
                            label=f"{workload} {name}",
                            console=console,
                        )
                    )
            for name, target, _address, workload, _own in scenarios:
                report.add(name, target, workload, PointSummary.median_of(points[name]))
        for proxy in proxies:
            procs.stop(proxy)
        procs.stop(echo_child)
        echo_child = None
        run_batching(
            report, console, batching_concurrency, max(duration, 6.0), max(warmup, 3.0), workdir, runs=1
        )
        binary = perf_mod.DEFAULT_BINARY
        if perf and perf_mod.available(binary):
            targets = [("worker", worker_url)] if worker_url else []
            targets.append(("gateway", gateway_url))
            run_perf_analyzer(report, console, [(k, v) for k, v in targets if v], binary, runs=runs)
        elif perf:
            report.notes.append("perf_analyzer rows skipped: run `make tools` to fetch .tools/perf_analyzer")
        if stack is not None:
            stack.stop()
            stack = None
        if compressor:
            run_compressor_bench(report, console)
        add_verdicts(report)
        import torch

        if not torch.cuda.is_available():
            report.notes.append(
                "encoder base bf16 at c=128 vs in-process batch 128 (GPU target of the worker issue): not measured, "
                "no GPU on this machine"
            )
        report.notes.append(
            f"each closed-loop point: {warmup:g} s warm-up, {duration:g} s measured (batching: "
            f"{max(warmup, 3.0):g} s + {max(duration, 6.0):g} s, one run each); client = one "
            "tritonclient.grpc.aio client on uvloop in a load-generator process of its own "
            "(`python -m mesh.benchtools.loadgen`), a fresh one for every run"
        )
        report.notes.append(f"whole run: {time.monotonic() - started:.0f} s")
    finally:
        if echo_child is not None:
            procs.stop(echo_child)
        if stack is not None:
            stack.stop()
        sink.close()
        failed = sum(r.result.errors for r in report.rows)
        if failed and not keep:
            # The services' logs are the only record of why requests failed: kept, and said where.
            keep = True
            report.notes.append(f"{failed} requests failed; the stack's logs are kept in {sink.path}")
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    _finish(report, out, console)
