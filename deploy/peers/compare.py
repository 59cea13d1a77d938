"""The mesh side by side with MLServer and KServe's Python model server: same machine, client, model.

Run with the project's venv, after `bash deploy/peers/install.sh` (or `make bench-peers`):

    .venv/bin/python deploy/peers/compare.py [--rounds 3] [--concurrency 1,16] [--out DIR]

What it does, every wait bounded in time:
1. starts the mesh (`python -m mesh.up --ephemeral-ports --demo-models digits --no-compressor
   --var-dir <tmp>/mesh`), which trains and exports the `digits` demo model into its store, and reads
   the gateway's and the worker's addresses from <tmp>/mesh/up.json (written once every model answers
   ready); the peers then serve that same `.pt2` file;
2. starts MLServer (`mlserver start`, runtime deploy/peers/mlserver_digits.py) and KServe
   (deploy/peers/kserve_digits.py, `kserve.ModelServer`), each in its own venv under .tools/peers/,
   gRPC on 127.0.0.1 ports picked here, and waits for ServerReady and ModelReady on each;
3. sends the same inputs to every target with tritonclient and checks the logits against the
   artifact run in this process (rtol 1e-5) before measuring anything;
4. measures every target with two clients, the targets interleaved, round after round:
   - Triton's perf_analyzer (`-m digits -i grpc -u HOST:PORT --shape pixels:1,64 --concurrency-range C
     --measurement-interval 2000 --stability-percentage 50 --max-trials 6`). It asks the server for the
     model's config first (ModelConfig, a Triton extension outside the KServe v2 protocol); a server
     without that RPC gets no load from it, and the run is recorded as failed with perf_analyzer's error;
   - tritonclient.grpc.aio closed loop (the project's `python -m mesh.benchtools.loadgen`: N coroutines
     on one channel, each sending its next request when the previous one returns, in a process of its
     own), the client every v2 server here answers; it also reports the CPU per request of each
     server process during the measured window (from /proc);
5. stops everything it started (SIGTERM, then SIGKILL after a grace period) and checks nothing is left.

Results (raw runs, medians, logs) go to --out (default var/peers/<UTC time>/): results.json, table.md.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PEERS_DIR = ROOT / ".tools" / "peers"
PERF_ANALYZER = ROOT / ".tools" / "perf_analyzer"
HERE = Path(__file__).resolve().parent
MODEL = "digits"
TICKS = os.sysconf("SC_CLK_TCK")


# ---- processes ----------------------------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 = state), or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is not None:
            out.setdefault(int(fields[1]), []).append(int(entry.name))
    return out


def descendants(pid: int) -> list[int]:
    """pid and every process below it (by parent pid), alive now."""
    children = _children_map()
    found, todo = [], [pid]
    while todo:
        cur = todo.pop()
        if _stat(cur) is None:
            continue
        found.append(cur)
        todo.extend(children.get(cur, []))
    return found


def machine_ticks() -> tuple[int, int, int]:
    """(busy, steal, total) clock ticks of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    steal = values[7] if len(values) > 7 else 0
    total = sum(values[:8])
    return total - idle - steal, steal, total


def machine_share(
    before: tuple[int, int, int], after: tuple[int, int, int], wall_s: float
) -> dict[str, float]:
    """Cores busy (every process on the machine, ours included) and cores stolen by the hypervisor."""
    busy, steal, _ = (a - b for a, b in zip(after, before, strict=True))
    return {"busy_cores": round(busy / TICKS / wall_s, 2), "steal_cores": round(steal / TICKS / wall_s, 2)}


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU of the given processes (those still alive), in seconds."""
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / TICKS


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Server:
    """One server process tree started here: its own session, output to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.name, self.argv, self.env, self.cwd, self.log = name, argv, env, cwd, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.known: dict[int, str] = {}  # every pid seen in its tree, with its command line

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        print(f"[{self.name}] pid {self.proc.pid}: {' '.join(self.argv)}", flush=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tree(self) -> list[int]:
        if self.proc is None:
            return []
        pids = descendants(self.proc.pid)
        for pid in pids:
            self.known.setdefault(pid, _cmdline(pid))
        return pids

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, grace_s: float) -> list[str]:
        """SIGTERM to the top process, SIGKILL to whatever of its tree is left after grace_s; returns what was killed."""
        if self.proc is None:
            return []
        self.tree()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(self._same(p, c) for p, c in self.known.items()):
            time.sleep(0.2)
        killed = []
        for pid, cmd in self.known.items():
            if self._same(pid, cmd):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(f"{pid} {cmd[:120]}")
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        return killed

    @staticmethod
    def _same(pid: int, cmd: str) -> bool:
        fields = _stat(pid)
        return fields is not None and fields[0] != "Z" and _cmdline(pid) == cmd


def leftovers(markers: list[str]) -> list[str]:
    """Processes anywhere on the machine whose command line names one of markers (`pgrep -fa` style)."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me:
            cmd = _cmdline(int(entry.name))
            if any(m in cmd for m in markers):
                found.append(f"{entry.name} {cmd[:160]}")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # No MAAS_* variable reaches any server: above all no MAAS_REDIS_URL, so the mesh starts its own
    # embedded Redis and never touches a shared one.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_") and k != "WORKERS"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


# ---- readiness and correctness ------------------------------------------------------------------------
def wait_ready(url: str, server: Server, timeout_s: float) -> float:
    """Polls ServerReady and ModelReady(digits); returns the seconds it took."""
    import tritonclient.grpc as grpcclient

    start = time.monotonic()
    client = grpcclient.InferenceServerClient(url)
    try:
        while True:
            if not server.alive():
                raise RuntimeError(f"{server.name} exited before it was ready:\n{server.log_tail()}")
            with contextlib.suppress(Exception):
                if client.is_server_ready(client_timeout=2) and client.is_model_ready(
                    MODEL, client_timeout=2
                ):
                    return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(
                    f"{server.name} not ready at {url} after {timeout_s:.0f} s:\n{server.log_tail()}"
                )
            time.sleep(0.5)
    finally:
        client.close()


def reference_logits(pt2: Path, batches: list[np.ndarray]) -> list[np.ndarray]:
    import torch

    torch.set_num_threads(1)
    module = torch.export.load(str(pt2)).module()
    with torch.inference_mode():
        return [module(torch.from_numpy(x)).numpy() for x in batches]


def check_same_logits(targets: dict[str, str], pt2: Path, rtol: float) -> dict[str, float]:
    """Every target's logits vs the artifact run here, for a batch of 1 and of 8; max |diff| per target."""
    import tritonclient.grpc as grpcclient

    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 17, size=(n, 64)).astype(np.float32) for n in (1, 8)]
    refs = reference_logits(pt2, batches)
    worst: dict[str, float] = {}
    for name, url in targets.items():
        client = grpcclient.InferenceServerClient(url)
        try:
            worst[name] = 0.0
            for x, ref in zip(batches, refs, strict=True):
                inp = grpcclient.InferInput("pixels", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                out = client.infer(MODEL, [inp], client_timeout=30).as_numpy("logits")
                if out is None or out.shape != ref.shape:
                    raise RuntimeError(
                        f"{name}: logits shape {None if out is None else out.shape}, want {ref.shape}"
                    )
                np.testing.assert_allclose(out, ref, rtol=rtol, atol=0, err_msg=f"{name} batch {len(x)}")
                worst[name] = max(worst[name], float(np.max(np.abs(out - ref))))
        finally:
            client.close()
        print(f"[check] {name}: logits match (max |diff| {worst[name]:.2e})", flush=True)
    return worst


# ---- load: perf_analyzer and the tritonclient aio closed loop --------------------------------------------
@dataclass
class Run:
    client: str
    """"perf_analyzer" or "tritonclient-aio" (mesh.benchtools.loadgen)."""
    target: str
    concurrency: int
    round: int
    ok: bool
    infer_s: float = float("nan")
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    requests: int = 0
    errors: int = 0
    wall_s: float = 0.0
    cpu_ms: dict[str, float] = field(default_factory=dict)
    """CPU ms per request by process group (and "client" for the load generator). tritonclient-aio: the
    measured window, exact; perf_analyzer: the whole run (warm-up and every trial) / (infer/s x wall s)."""
    machine: dict[str, float] = field(default_factory=dict)
    """The whole machine over the run (load generator start-up included): cores busy, cores stolen."""
    error: str = ""

    def line(self) -> str:
        if not self.ok:
            return f"FAILED {self.error}"
        return f"{self.infer_s:8.0f} infer/s  p50 {self.p50_ms:6.2f} ms  p99 {self.p99_ms:6.2f} ms"


def perf_argv(url: str, concurrency: int, interval_ms: int, csv_path: Path) -> list[str]:
    return [
        str(PERF_ANALYZER),
        "-m",
        MODEL,
        "-i",
        "grpc",
        "-u",
        url,
        "--shape",
        "pixels:1,64",
        "--concurrency-range",
        str(concurrency),
        "--measurement-interval",
        str(interval_ms),
        "--stability-percentage",
        "50",
        "--max-trials",
        "6",
        "-f",
        str(csv_path),
    ]


def _run_bounded(argv: list[str], timeout_s: float) -> tuple[int, str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return -1, partial + f"\n(killed after {timeout_s:.0f} s)"
    return proc.returncode, proc.stdout + proc.stderr


def _tail(output: str, n: int = 3) -> str:
    return " | ".join([ln for ln in output.strip().splitlines() if ln.strip()][-n:])


@dataclass
class Point:
    """One measurement: a target at one concurrency in one round, and where its figures go."""

    target: str
    url: str
    concurrency: int
    rnd: int
    args: argparse.Namespace
    groups: dict[str, list[int]]
    """Process groups whose CPU time is read (name -> pids)."""
    out: Path


def run_perf(point: Point) -> Run:
    target, url, concurrency, rnd = point.target, point.url, point.concurrency, point.rnd
    args, groups, out = point.args, point.groups, point.out
    stem = f"perf-{target}-c{concurrency}-r{rnd}"
    csv_path = out / f"{stem}.csv"
    cpu0 = {g: cpu_seconds(p) for g, p in groups.items()}
    ticks0 = machine_ticks()
    t0 = time.monotonic()
    rc, output = _run_bounded(
        perf_argv(url, concurrency, args.measurement_interval, csv_path), args.perf_timeout
    )
    wall = time.monotonic() - t0
    cpu_s = {g: cpu_seconds(p) - cpu0[g] for g, p in groups.items()}
    share = machine_share(ticks0, machine_ticks(), wall)
    (out / f"{stem}.log").write_text(output)
    run = Run("perf_analyzer", target, concurrency, rnd, ok=False, wall_s=round(wall, 1), machine=share)
    rows = list(csv.DictReader(csv_path.read_text().splitlines())) if rc == 0 and csv_path.exists() else []
    if rows:
        run.ok = True
        run.infer_s = float(rows[0]["Inferences/Second"])
        run.p50_ms = float(rows[0]["p50 latency"]) / 1000.0
        run.p99_ms = float(rows[0]["p99 latency"]) / 1000.0
        run.cpu_ms = {g: round(1000 * v / (run.infer_s * wall), 3) for g, v in cpu_s.items()}
    else:
        run.error = f"rc {rc}: {_tail(output)}"
    print(
        f"[perf_analyzer]    round {rnd} c={concurrency:<2} {target:<13} {run.line()}  ({wall:.0f} s)",
        flush=True,
    )
    return run


def run_loadgen(point: Point) -> Run:
    """One closed-loop point from the project's load generator (tritonclient.grpc.aio, a process of its own)."""
    target, url, concurrency, rnd = point.target, point.url, point.concurrency, point.rnd
    args, groups, out = point.args, point.groups, point.out
    argv = [str(ROOT / ".venv" / "bin" / "python"), "-m", "mesh.benchtools.loadgen", url, MODEL]
    argv += ["-c", str(concurrency), "--duration", str(args.duration), "--warmup", str(args.warmup)]
    argv += ["--model", MODEL]
    for group, pids in groups.items():
        argv += [f"--pid={group}|{pid}={pid}" for pid in pids]
    ticks0 = machine_ticks()
    t0 = time.monotonic()
    rc, output = _run_bounded(argv, args.duration + args.warmup + 60)
    wall = time.monotonic() - t0
    share = machine_share(ticks0, machine_ticks(), wall)
    (out / f"aio-{target}-c{concurrency}-r{rnd}.log").write_text(output)
    run = Run("tritonclient-aio", target, concurrency, rnd, ok=False, wall_s=round(wall, 1), machine=share)
    lines = [ln for ln in output.splitlines() if ln.startswith("{")]
    if rc == 0 and lines:
        data = json.loads(lines[-1])
        run.requests, run.errors = int(data["requests"]), int(data["errors"])
        run.infer_s, run.p50_ms, run.p99_ms = float(data["rps"]), float(data["p50_ms"]), float(data["p99_ms"])
        for name, ms in data["cpu_ms"].items():
            group = name.split("|", 1)[0]
            run.cpu_ms[group] = round(run.cpu_ms.get(group, 0.0) + float(ms), 3)
        run.ok = run.errors == 0 and run.requests > 0
        if not run.ok:
            run.error = f"{run.errors} errors, {run.requests} ok: {data.get('first_error', '')}"
    else:
        run.error = f"rc {rc}: {_tail(output)}"
    print(
        f"[tritonclient-aio] round {rnd} c={concurrency:<2} {target:<13} {run.line()}  ({wall:.0f} s)",
        flush=True,
    )
    return run


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    rows = []
    keys = list(dict.fromkeys((r.client, r.concurrency, r.target) for r in runs))
    for client, c, t in sorted(keys, key=lambda k: (k[0] != "tritonclient-aio", k[1])):
        mine = [r for r in runs if (r.client, r.concurrency, r.target) == (client, c, t)]
        ok = [r for r in mine if r.ok]
        row: dict[str, Any] = {
            "client": client,
            "target": t,
            "concurrency": c,
            "runs": len(mine),
            "ok": len(ok),
        }
        if ok:
            row["infer_s"] = statistics.median(r.infer_s for r in ok)
            row["p50_ms"] = statistics.median(r.p50_ms for r in ok)
            row["p99_ms"] = statistics.median(r.p99_ms for r in ok)
            row["infer_s_all"] = [round(r.infer_s) for r in ok]
            row["server_cpu_ms"] = statistics.median(
                sum(r.cpu_ms.get(g, 0.0) for g in TARGET_GROUPS[t]) for r in ok
            )
            row["client_cpu_ms"] = statistics.median(r.cpu_ms.get("client", float("nan")) for r in ok)
            row["machine_busy_cores"] = statistics.median(r.machine.get("busy_cores", 0.0) for r in ok)
            row["machine_steal_cores"] = statistics.median(r.machine.get("steal_cores", 0.0) for r in ok)
            row["bystanders_cpu_ms"] = statistics.median(
                sum(v for g, v in r.cpu_ms.items() if g not in TARGET_GROUPS[t] and g != "client") for r in ok
            )
        else:
            row["error"] = mine[0].error if mine else ""
        rows.append(row)
    return rows


# Which CPU groups are on the request path of each target (the others idle during its runs).
TARGET_GROUPS = {
    "mlserver": ["mlserver"],
    "kserve": ["kserve"],
    "mesh-worker": ["mesh-worker"],
    "mesh-gateway": ["mesh-gateway", "mesh-worker"],
}
LABELS = {
    "mlserver": "MLServer",
    "kserve": "KServe ModelServer",
    "mesh-worker": "mesh worker (direct)",
    "mesh-gateway": "mesh gateway → worker",
}


def table_md(rows: list[dict[str, Any]]) -> str:
    out = []
    for client in dict.fromkeys(r["client"] for r in rows):
        aio = client == "tritonclient-aio"
        cpu = "server CPU ms/req | client CPU ms/req" if aio else "≈ server CPU ms/req (whole run)"
        out += [
            f"Client: {client}",
            "",
            f"| target | concurrency | infer/s | p50 ms | p99 ms | {cpu} | runs ok | infer/s of each run |",
            "| --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if aio else "") + " ---: | --- |",
        ]
        for r in (r for r in rows if r["client"] == client):
            label = LABELS.get(r["target"], r["target"])
            if "infer_s" not in r:
                blanks = "| | " if aio else "| "
                out.append(
                    f"| {label} | {r['concurrency']} | failed | | | {blanks}0/{r['runs']} | {r['error']} |"
                )
                continue
            cpu_cells = f"{r['server_cpu_ms']:.2f} |" + (f" {r['client_cpu_ms']:.2f} |" if aio else "")
            out.append(
                f"| {label} | {r['concurrency']} | {r['infer_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{cpu_cells} {r['ok']}/{r['runs']} | {', '.join(f'{v:,}' for v in r['infer_s_all'])} |"
            )
        out.append("")
    return "\n".join(out)


# ---- machine ------------------------------------------------------------------------------------------
def machine() -> dict[str, object]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions(peers: set[str]) -> dict[str, str]:
    found = {}
    for peer in sorted(peers):
        for package in (peer, "torch", "grpcio", "numpy"):
            found[f"{package} ({peer} venv)"] = pip_version(PEERS_DIR / peer, package)
    for package in ("grpcio", "torch", "tritonclient", "numpy"):
        found[f"{package} (project venv: mesh, client)"] = pip_version(ROOT / ".venv", package)
    return found


def pip_version(venv: Path, package: str) -> str:
    try:
        out = subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                f"import importlib.metadata as m; print(m.version('{package}'))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        return f"unavailable ({exc})"
    return out.stdout.strip()


# ---- main ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", default="1,16", help="comma-separated concurrency levels")
    p.add_argument("--measurement-interval", type=int, default=2000, help="perf_analyzer window, ms")
    p.add_argument("--targets", default="mlserver,kserve,mesh-worker,mesh-gateway")
    p.add_argument("--out", type=Path, default=None, help="results folder (default var/peers/<UTC time>)")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for each server to be ready")
    p.add_argument("--perf-timeout", type=float, default=90.0, help="seconds for one perf_analyzer run")
    p.add_argument("--duration", type=float, default=4.0, help="tritonclient-aio: measured seconds per point")
    p.add_argument("--warmup", type=float, default=0.5, help="tritonclient-aio: unmeasured seconds first")
    p.add_argument("--rtol", type=float, default=1e-5)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGET_GROUPS)
    if unknown:
        raise SystemExit(f"unknown targets: {sorted(unknown)}")
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = (args.out or ROOT / "var" / "peers" / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not PERF_ANALYZER.exists():
        raise SystemExit(f"{PERF_ANALYZER} missing: run `make tools`")
    venvs = {"mlserver": PEERS_DIR / "mlserver", "kserve": PEERS_DIR / "kserve"}
    skipped: dict[str, str] = {}
    for name in [t for t in targets if t in venvs]:
        # install.sh leaves a marker in a venv it completed, and the error of one it could not build.
        if not (venvs[name] / ".installed").exists():
            error = PEERS_DIR / f"{name}.error"
            skipped[name] = (
                error.read_text().strip() if error.exists() else "venv missing: run deploy/peers/install.sh"
            )
            print(f"[{name}] skipped: {skipped[name]}", flush=True)
            targets.remove(name)
    wanted = {t for t in targets if t in venvs}
    tmp = Path(tempfile.mkdtemp(prefix="maas-peers-"))

    # SIGTERM (make's, a timeout's) unwinds through the finally below like Ctrl-C does.
    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_term)
    info: dict[str, object] = {
        "started_utc": stamp,
        "command": " ".join([".venv/bin/python", "deploy/peers/compare.py", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "skipped": skipped,
        "versions": versions(wanted),
    }
    print(f"results in {out}; scratch in {tmp}", flush=True)
    servers: list[Server] = []
    runs: list[Run] = []
    rc = 0
    t_start = time.monotonic()
    try:
        # 1. the mesh: builds the digits artifact the peers will serve.
        mesh_var = tmp / "mesh"
        mesh = Server(
            "mesh",
            [
                str(ROOT / ".venv" / "bin" / "python"),
                "-m",
                "mesh.up",
                "--ephemeral-ports",
                "--demo-models",
                MODEL,
                "--no-compressor",
                "--var-dir",
                str(mesh_var),
            ],
            _clean_env(),
            ROOT,
            out / "mesh.log",
        )
        servers.append(mesh)
        mesh.start()
        up_json = mesh_var / "up.json"
        deadline = time.monotonic() + args.start_timeout
        while not up_json.exists():
            if not mesh.alive():
                raise RuntimeError(f"mesh.up exited before it was up:\n{mesh.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mesh not up after {args.start_timeout:.0f} s:\n{mesh.log_tail()}")
            time.sleep(0.5)
        endpoints = json.loads(up_json.read_text())
        urls: dict[str, str] = {"mesh-worker": endpoints["worker-0"], "mesh-gateway": endpoints["gateway"]}
        for name in ("mesh-worker", "mesh-gateway"):
            print(
                f"[mesh] {name} at {urls[name]} ready in {wait_ready(urls[name], mesh, 60):.1f} s", flush=True
            )
        artifacts = sorted((mesh_var / "models" / MODEL).glob("*/model.pt2"))
        if len(artifacts) != 1:
            raise RuntimeError(f"expected one {MODEL} model.pt2 in the mesh's store, found {artifacts}")
        pt2 = artifacts[0]
        info["artifact"] = str(pt2.relative_to(tmp))
        print(f"[mesh] artifact {pt2}", flush=True)

        # 2. MLServer: settings.json (server) + digits/model-settings.json (model), default settings else.
        if "mlserver" in wanted:
            repo = tmp / "mlserver"
            (repo / MODEL).mkdir(parents=True)
            grpc_port = free_port()
            settings = {
                "host": "127.0.0.1",
                "grpc_port": grpc_port,
                "http_port": free_port(),
                "metrics_port": free_port(),
            }
            model_settings = {
                "name": MODEL,
                "implementation": "mlserver_digits.DigitsRuntime",
                "parameters": {"uri": str(pt2)},
                "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
                "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
            }
            (repo / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
            (repo / MODEL / "model-settings.json").write_text(json.dumps(model_settings, indent=2) + "\n")
            info["mlserver_settings"] = {"settings.json": settings, "model-settings.json": model_settings}
            mls = Server(
                "mlserver",
                [str(venvs["mlserver"] / "bin" / "mlserver"), "start", str(repo)],
                _clean_env({"PYTHONPATH": str(HERE)}),
                repo,
                out / "mlserver.log",
            )
            servers.append(mls)
            mls.start()
            urls["mlserver"] = f"127.0.0.1:{grpc_port}"
            print(
                f"[mlserver] ready in {wait_ready(urls['mlserver'], mls, args.start_timeout):.1f} s",
                flush=True,
            )

        # 3. KServe: kserve.ModelServer(grpc_port=...), default settings else.
        if "kserve" in wanted:
            grpc_port, http_port = free_port(), free_port()
            ks = Server(
                "kserve",
                [
                    str(venvs["kserve"] / "bin" / "python"),
                    str(HERE / "kserve_digits.py"),
                    "--model_name",
                    MODEL,
                    "--model_path",
                    str(pt2),
                    "--grpc_port",
                    str(grpc_port),
                    "--http_port",
                    str(http_port),
                ],
                _clean_env(),
                tmp,
                out / "kserve.log",
            )
            servers.append(ks)
            ks.start()
            urls["kserve"] = f"127.0.0.1:{grpc_port}"
            print(f"[kserve] ready in {wait_ready(urls['kserve'], ks, args.start_timeout):.1f} s", flush=True)

        # 4. same logits everywhere before any measurement.
        info["max_abs_diff"] = check_same_logits({t: urls[t] for t in targets}, pt2, args.rtol)

        # CPU groups: each peer's whole tree; the mesh split by service (names from <var>/up.pids).
        pids_by_name = dict(
            (name, int(pid))
            for name, pid in (
                ln.split() for ln in (mesh_var / "up.pids").read_text().splitlines() if ln.strip()
            )
        )
        groups: dict[str, list[int]] = {
            "mesh-worker": descendants(pids_by_name["worker-0"]),
            "mesh-gateway": descendants(pids_by_name["gateway"]),
            "mesh-other": [
                p
                for p in mesh.tree()
                if p not in descendants(pids_by_name["worker-0"])
                and p not in descendants(pids_by_name["gateway"])
            ],
        }
        for srv in servers:
            if srv.name != "mesh":
                groups[srv.name] = srv.tree()
        info["cpu_groups"] = {g: [f"{p} {_cmdline(p)[:100]}" for p in pids] for g, pids in groups.items()}
        info["load_before_measuring"] = os.getloadavg()

        # 5. both clients, the targets interleaved, every round.
        for rnd in range(1, args.rounds + 1):
            for c in concurrencies:
                for t in targets:
                    point = Point(t, urls[t], c, rnd, args, groups, out)
                    runs.append(run_perf(point))
                    runs.append(run_loadgen(point))
        info["load_after_measuring"] = os.getloadavg()
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'SIGINT'}): stopping the servers", flush=True)
        rc = 130
    except Exception as exc:  # reported, then everything is stopped
        print(f"FAILED: {exc}", flush=True)
        info["error"] = str(exc)
        rc = 1
    finally:
        stray: list[str] = []
        for srv in reversed(servers):
            killed = srv.stop(grace_s=30)
            if killed:
                print(f"[{srv.name}] had to SIGKILL: {killed}", flush=True)
            stray += [f"{pid} {cmd}" for pid, cmd in srv.known.items() if Server._same(pid, cmd)]
        # And anything that left the trees (double fork): a command line naming our scratch folder or venvs.
        stray += leftovers([str(tmp), str(PEERS_DIR), str(HERE / "kserve_digits.py")])
        info["stray_processes"] = stray
        if stray:
            print(f"STRAY processes left: {stray}", flush=True)
            rc = rc or 1
        info["wall_s"] = round(time.monotonic() - t_start, 1)

    rows = summarize(runs)
    if runs:
        for key in ("busy_cores", "steal_cores"):
            values = sorted(r.machine.get(key, 0.0) for r in runs if r.ok)
            if values:
                info[f"machine_{key}"] = {
                    "min": values[0],
                    "median": statistics.median(values),
                    "max": values[-1],
                }
                print(f"whole machine during the runs, {key}: {info[f'machine_{key}']}", flush=True)
    (out / "results.json").write_text(
        json.dumps({**info, "summary": rows, "runs": [asdict(r) for r in runs]}, indent=2, default=str) + "\n"
    )
    if rows:
        table = table_md(rows)
        (out / "table.md").write_text(table)
        print("\n" + table, flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"whole run: {info['wall_s']} s; results in {out}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
