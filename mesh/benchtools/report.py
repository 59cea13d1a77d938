"""Benchmark report: machine facts, result tables and target verdicts as markdown for docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from mesh.benchtools.load import LoadResult

HEADER = """# Benchmarks

Figures from `make bench` (`python -m mesh.cli bench all --out docs/benchmarks.md`): a private stack
(embedded Redis, demo models, router, worker, gateway on free ports) started by the benchmark itself,
closed-loop load from tritonclient's aio client (N coroutines on one channel, each sending its next
request when the previous one returns), plus Triton's perf_analyzer when `make tools` fetched it.
The load generator shares the machine with the services it measures; on the 2-vCPU development VM
that is about one core of real work for everything (see shared/reference/measurements.md), so the
figures are noisy: compare rows of the same run, not across runs. Newest run first.
"""


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = "{:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg())
    except OSError:
        load = "?"
    info = {
        "load": load,
        "nproc": str(os.cpu_count() or 0),
        "cpu": cpu or "unknown",
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except ImportError:
        info["torch"] = "not installed"
    try:
        import grpc

        info["grpcio"] = grpc.__version__
    except ImportError:
        pass
    return info


@dataclass
class Row:
    scenario: str
    target: str
    model: str
    result: LoadResult
    note: str = ""


@dataclass
class Verdict:
    name: str
    target: str
    measured: str
    met: bool | None
    """None = not measured."""


@dataclass
class Report:
    command: str
    started: float = field(default_factory=time.time)
    rows: list[Row] = field(default_factory=list)
    perf_rows: list[tuple[str, str, int, float, float, float]] = field(default_factory=list)
    """(target, model, concurrency, req/s, p50 ms, p99 ms) from perf_analyzer."""
    perf_commands: list[str] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra_sections: list[str] = field(default_factory=list)
    load_at_start: str = field(default_factory=lambda: machine_info()["load"])
    """Other work on the machine skews every figure: the load average when the run began."""

    def add(self, scenario: str, target: str, model: str, result: LoadResult, note: str = "") -> Row:
        row = Row(scenario, target, model, result, note)
        self.rows.append(row)
        return row

    def find(self, scenario: str, concurrency: int) -> LoadResult | None:
        for row in self.rows:
            if row.scenario == scenario and row.result.concurrency == concurrency:
                return row.result
        return None

    def markdown(self) -> str:
        info = machine_info()
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.started))
        out = [f"## Run of {when}", ""]
        out.append(f"Command: `{self.command}`  ")
        out.append(
            f"Machine: {info['nproc']} × {info['cpu']}, GPU {info.get('gpu', 'none')}, {info['os']}; "
            f"Python {info['python']}, torch {info['torch']}, grpcio {info.get('grpcio', '?')}; "
            f"load average (1/5/15 min) at the start: {self.load_at_start or info['load']}"
        )
        out.append("")
        if self.verdicts:
            out += ["### Targets", "", "| target | goal | measured | verdict |", "| --- | --- | --- | --- |"]
            for v in self.verdicts:
                verdict = "not measured" if v.met is None else ("**met**" if v.met else "**not met**")
                out.append(f"| {v.name} | {v.target} | {v.measured} | {verdict} |")
            out.append("")
        if self.rows:
            out += [
                "### Closed loop (tritonclient aio)",
                "",
                "| scenario | target | model | concurrency | req/s | p50 ms | p99 ms | requests | errors | note |",
                "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
            ]
            for row in self.rows:
                r = row.result
                note = row.note or (r.first_error.replace("|", "/")[:80] if r.first_error else "")
                out.append(
                    f"| {row.scenario} | {row.target} | {row.model} | {r.concurrency} | {r.rps:,.0f} | "
                    f"{r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.requests} | {r.errors} | {note} |"
                )
            out.append("")
        if self.perf_rows:
            out += [
                "### perf_analyzer (Triton's C++ load generator, synchronous gRPC)",
                "",
                "| target | model | concurrency | req/s | p50 ms | p99 ms |",
                "| --- | --- | ---: | ---: | ---: | ---: |",
            ]
            for target, model, c, rps, p50, p99 in self.perf_rows:
                out.append(f"| {target} | {model} | {c} | {rps:,.0f} | {p50:.2f} | {p99:.2f} |")
            out.append("")
            out += [f"- `{cmd}`" for cmd in self.perf_commands]
            out.append("")
        for section in self.extra_sections:
            out += [section.rstrip(), ""]
        if self.notes:
            out += ["### Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        return "\n".join(out)

    def write(self, path: Path) -> None:
        """Puts this run at the top of the file (under the header), keeping earlier runs below it."""
        previous = path.read_text() if path.exists() else ""
        runs = previous.split("\n## Run of ", 1)
        older = "## Run of " + runs[1] if len(runs) == 2 else ""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(HEADER + "\n" + self.markdown() + ("\n" + older if older else ""))
