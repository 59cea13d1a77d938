"""Benchmark-owned processes: the bare echo server and standalone workers, started on free ports."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import IO

from mesh.up import Child, StackError, wait_healthy


class FileSink:
    """Collects child output in a log file (benchmarks keep the terminal for figures)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh: IO[str] = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def __call__(self, name: str, line: str) -> None:
        with self._lock:
            self._fh.write(f"{name:<11}| {line}\n")
            self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _wait_line(child: Child, prefix: str, timeout_s: float, lines: list[str], event: threading.Event) -> str:
    deadline = time.monotonic() + timeout_s
    while not event.wait(0.05):
        if child.poll() is not None:
            raise StackError(f"{child.name} exited with code {child.poll()} before printing {prefix}")
        if time.monotonic() > deadline:
            raise StackError(f"{child.name}: no {prefix} line within {timeout_s:.0f} s")
    return next(line for line in lines if line.startswith(prefix))


def start_echo(
    sink: FileSink,
    *,
    python: str = sys.executable,
    timeout_s: float = 30.0,
    proxy: str = "",
    upstream: str = "stream",
) -> Child:
    """The bare grpc.aio echo server (mesh.benchtools.echo) on a free port; child.address is set.
    With `proxy` (an echo's address), a bare proxy in front of it instead (`upstream`: stream|unary)."""
    lines: list[str] = []
    seen = threading.Event()

    def capture(name: str, line: str) -> None:
        if line.startswith("PORT "):
            lines.append(line)
            seen.set()
        sink(name, line)

    argv = [python, "-m", "mesh.benchtools.echo", "--bind", "127.0.0.1:0"]
    if proxy:
        argv += ["--proxy", proxy, "--upstream", upstream]
    child = Child(f"proxy-{upstream}" if proxy else "echo", argv, _env({}), capture)
    child.start()
    line = _wait_line(child, "PORT ", timeout_s, lines, seen)
    child.address = f"127.0.0.1:{int(line.split()[1])}"
    wait_healthy_v2(child.address, timeout_s)
    return child


def start_standalone_worker(
    sink: FileSink, store_dir: Path, env: dict[str, str] | None = None, *, python: str = sys.executable
) -> Child:
    """A worker with no registry (versions arrive by LoadVersion) on a free port."""
    own = {
        "MAAS_WORKER_BIND": "127.0.0.1:0",
        "MAAS_WORKER_REGISTRY": "false",
        "MAAS_STORE_DIR": str(store_dir.resolve()),
        "MAAS_WORKER_DEVICE": "auto",
        "MAAS_LOG_JSON": "false",
        **(env or {}),
    }
    child = Child("worker-bench", [python, "-m", "workers"], _env(own), sink)
    child.start()
    deadline = time.monotonic() + 120
    while not child.bound.wait(0.1):
        if child.poll() is not None:
            raise StackError(f"standalone worker exited with code {child.poll()}; see {sink.path}")
        if time.monotonic() > deadline:
            raise StackError(f"standalone worker did not listen within 120 s; see {sink.path}")
    wait_healthy(child.address, 120, alive=lambda: child.poll() is None)
    return child


def wait_healthy_v2(address: str, timeout_s: float) -> None:
    """Waits for a v2 server without grpc.health (the echo): ServerLive through tritonclient."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                if client.is_server_live():
                    return
            except Exception:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)
    finally:
        client.close()


def stop(child: Child | None, timeout_s: float = 30.0) -> None:
    if child is not None:
        child.terminate()
        child.wait(timeout_s)


def _env(own: dict[str, str]) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(own)
    return env
