"""Reliability harness: real service subprocesses (kill -9 / SIGTERM), a persistent Redis, steady load.

Everything binds 127.0.0.1, every wait has a timeout, every load loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from mesh.redis_embed import EmbeddedRedis
from mesh.store import Artifact, ArtifactStore
from mesh_pb import common_pb2, registry_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

WORKER_READY = re.compile(r"WORKER_READY (\S+) (\S+)")
GATEWAY_READY = re.compile(r"GATEWAY_READY (\S+)")
# ServiceHost.start logs "<name> listening on <address>" once the server is up.
ROUTER_READY = re.compile(r"router listening on (127\.0\.0\.1:\d+)")
COMPRESSOR_READY = re.compile(r"(?:COMPRESSOR_READY|compressor listening on) (127\.0\.0\.1:\d+)")


# ---------------------------------------------------------------------------------------------- waiting


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Polls `predicate` until it returns something truthy; raises TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.1f}s waiting for {what}")
        time.sleep(interval_s)


async def async_wait_until(
    predicate: Callable[[], Awaitable[Any]], timeout_s: float, what: str, interval_s: float = 0.05
) -> Any:
    """Async twin of wait_until; exceptions raised by the predicate count as "not yet"."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while True:
        try:
            value = await asyncio.wait_for(predicate(), max(0.5, deadline - time.monotonic()))
            if value:
                return value
        except Exception as exc:
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.1f}s waiting for {what} (last error: {last!r})")
        await asyncio.sleep(interval_s)


def rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS from /proc/<pid>/status), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def short_tmpdir(prefix: str = "rel") -> Path:
    """A short directory under /tmp (unix socket paths are limited to ~107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# ---------------------------------------------------------------------------------------------- processes


def service_env(
    redis_url: str, prefix: str, store_dir: Path, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a service subprocess: this one minus any MAAS_* variable, plus the mesh's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    env.update(
        {
            "MAAS_REDIS_URL": redis_url,
            "MAAS_KEY_PREFIX": prefix,
            "MAAS_STORE_DIR": str(store_dir),
            "MAAS_LOG_JSON": "true",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(extra or {})
    return env


class ServiceProcess:
    """One `python -m <module>` subprocess; stdout and stderr go to files (appended across restarts)."""

    def __init__(
        self,
        name: str,
        module: str,
        env: Mapping[str, str],
        log_dir: Path,
        ready: re.Pattern[str],
        *,
        ready_in_stderr: bool = False,
    ) -> None:
        self.name = name
        self.module = module
        self.env = dict(env)
        self.ready = ready
        self.ready_in_stderr = ready_in_stderr
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        self.proc: subprocess.Popen[bytes] | None = None
        self.match: re.Match[str] | None = None
        self.started_s = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} not started"
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def address(self) -> str:
        assert self.match is not None, f"{self.name} not ready"
        return self.match.group(self.match.re.groups)

    def start(self, timeout_s: float = 60.0, env: Mapping[str, str] | None = None) -> ServiceProcess:
        """Starts the process and waits for its ready line; returns self."""
        if env:
            self.env.update(env)
        watched = self.stderr_path if self.ready_in_stderr else self.stdout_path
        offset = watched.stat().st_size if watched.exists() else 0
        t0 = time.monotonic()
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", self.module],
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

        def ready() -> re.Match[str] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before it was ready:\n{self.tail()}"
                )
            with open(watched, "rb") as fh:
                fh.seek(offset)
                text = fh.read().decode("utf-8", "replace")
            return self.ready.search(text)

        try:
            self.match = wait_until(ready, timeout_s, f"{self.name} ready line", interval_s=0.05)
        except TimeoutError:
            self.kill()
            raise TimeoutError(f"{self.name} not ready in {timeout_s}s:\n{self.tail()}") from None
        self.started_s = time.monotonic() - t0
        return self

    def kill(self) -> None:
        """kill -9."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self) -> None:
        """SIGTERM (returns at once; see wait)."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then kill -9 if it does not exit in time."""
        if not self.alive:
            return
        self.terminate()
        try:
            self.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def logs(self) -> str:
        parts = []
        for path in (self.stdout_path, self.stderr_path):
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.logs().splitlines()[-n:])


class PersistentRedis:
    """A private Redis with appendonly persistence that can be killed with -9 and restarted on its data."""

    def __init__(self, data_dir: Path, appendfsync: str = "everysec") -> None:
        self.data_dir = data_dir
        self.appendfsync = appendfsync
        self.server: EmbeddedRedis | None = None
        self.url = ""

    def start(self) -> str:
        self.server = EmbeddedRedis(self.data_dir, persist=True)
        self.url = self.server.start()
        if self.appendfsync != "everysec":  # EmbeddedRedis starts with everysec
            import redis

            client = redis.Redis.from_url(self.url)
            try:
                client.config_set("appendfsync", self.appendfsync)
            finally:
                client.close()
        return self.url

    @property
    def pid(self) -> int:
        assert self.server is not None and self.server.proc is not None
        return self.server.proc.pid

    def kill(self) -> None:
        """kill -9 (no shutdown, no final AOF flush by the server)."""
        assert self.server is not None and self.server.proc is not None
        self.server.proc.send_signal(signal.SIGKILL)
        self.server.proc.wait(timeout=10)
        self.server.proc = None

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


# ---------------------------------------------------------------------------------------------- models


def digits_signature(max_batch_size: int = 64) -> common_pb2.Signature:
    return common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="pixels", datatype="FP32", shape=[-1, 64])],
        outputs=[common_pb2.TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])],
        max_batch_size=max_batch_size,
    )


@dataclass
class DigitsArtifact:
    """A small untrained `digits_mlp` saved as module_state, plus the module to compute references."""

    artifact: Artifact
    module: Any

    def reference(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.module(torch.from_numpy(np.array(pixels, dtype=np.float32))).numpy()


def make_digits_artifact(store: ArtifactStore, model: str, tag: str, seed: int = 0) -> DigitsArtifact:
    """Builds and stores a digits MLP (random weights, seeded): fast, and exact to check against."""
    import torch

    from workers.models import build, save_module_state

    torch.manual_seed(seed)
    module = build("digits_mlp", {"hidden": [32]}).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_module_state(module, Path(tmp) / "model.pt", arch="digits_mlp")
        art = store.put_file(model, tag, path, "model.pt")
    return DigitsArtifact(art, module)


def register_request(
    model: str,
    art: Artifact,
    *,
    min_replicas: int = 1,
    state: int = common_pb2.REGISTERED,
    labels: Mapping[str, str] | None = None,
    delay_us: int = 0,
) -> registry_pb2.RegisterVersionRequest:
    return registry_pb2.RegisterVersionRequest(
        model=model,
        artifact_uri=art.uri,
        sha256=art.sha256,
        format="module_state",
        signature=digits_signature(),
        batching=common_pb2.BatchingConfig(enabled=True, max_queue_delay_us=delay_us),
        dtype="fp32",
        state=state,  # type: ignore[arg-type]
        min_replicas=min_replicas,
        labels=dict(labels or {}),
    )


# ---------------------------------------------------------------------------------------------- load


@dataclass
class LoadReport:
    """What a steady load saw: successes, failures per status code, and when each request ended."""

    ok: int = 0
    wrong: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    failure_details: list[str] = field(default_factory=list)
    # (end time (monotonic), status code name) of every request, in completion order.
    events: list[tuple[float, str]] = field(default_factory=list)
    started: float = 0.0
    stopped: float = 0.0

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def total(self) -> int:
        return self.ok + self.failed

    def ok_between(self, t0: float, t1: float) -> int:
        return sum(1 for t, code in self.events if code == "OK" and t0 <= t <= t1)

    def failed_between(self, t0: float, t1: float) -> int:
        return sum(1 for t, code in self.events if code != "OK" and t0 <= t <= t1)

    def max_gap(self, t0: float, t1: float) -> float:
        """Longest time within [t0, t1] without a successful response (t0 and t1 bound the gaps; t1 is
        clamped to when the load stopped)."""
        if self.stopped:
            t1 = min(t1, self.stopped)
        times = [t for t, code in self.events if code == "OK" and t0 <= t <= t1]
        edges = [t0, *times, t1]
        return max(b - a for a, b in itertools.pairwise(edges))

    def first_ok_after(self, t: float) -> float | None:
        for end, code in self.events:
            if code == "OK" and end >= t:
                return end
        return None

    def summary(self) -> dict[str, Any]:
        duration = max(1e-9, self.stopped - self.started)
        return {
            "requests": self.total,
            "ok": self.ok,
            "failed": self.failed,
            "wrong_values": self.wrong,
            "failures_by_code": dict(self.failures),
            "duration_s": round(duration, 3),
            "rps": round(self.total / duration, 1),
        }


class SteadyLoad:
    """A few tritonclient aio clients calling ModelInfer in a closed loop against the gateway.

    Bounded: stops after `max_requests` in all or `max_seconds`, whichever comes first. Every answer is
    compared with the reference logits; any exception counts as a failure under its status code name.
    """

    def __init__(
        self,
        url: str,
        model: str,
        pixels: np.ndarray,
        expected: np.ndarray,
        *,
        clients: int = 3,
        headers: Mapping[str, str] | None = None,
        max_requests: int = 50_000,
        max_seconds: float = 120.0,
        request_timeout_s: float = 10.0,
        pause_s: float = 0.0,
        client_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.model = model
        self.pixels = np.asarray(pixels, dtype=np.float32)
        self.expected = expected
        self.clients = clients
        self.headers = dict(headers or {})
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.request_timeout_s = request_timeout_s
        self.pause_s = pause_s
        self.client_kwargs = dict(client_kwargs or {})
        self.report = LoadReport()
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._progress = asyncio.Event()

    async def _client(self) -> None:
        import tritonclient.grpc.aio as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(self.url, **self.client_kwargs)
        report = self.report
        deadline = report.started + self.max_seconds
        try:
            while (
                not self._stop.is_set() and report.total < self.max_requests and time.monotonic() < deadline
            ):
                inp = grpcclient.InferInput("pixels", list(self.pixels.shape), "FP32")
                inp.set_data_from_numpy(self.pixels)
                try:
                    result = await client.infer(
                        self.model,
                        [inp],
                        headers=self.headers or None,
                        client_timeout=self.request_timeout_s,
                    )
                except InferenceServerException as exc:
                    code = (exc.status() or "UNKNOWN").replace("StatusCode.", "")
                    report.failures[code] += 1
                    if len(report.failure_details) < 20:
                        report.failure_details.append(f"{code}: {exc.message()}")
                    report.events.append((time.monotonic(), code))
                    await asyncio.sleep(0.01)  # a failing client does not spin
                    continue
                logits = result.as_numpy("logits")
                if logits is None or not np.allclose(logits, self.expected, rtol=1e-4, atol=1e-4):
                    report.wrong += 1
                report.ok += 1
                report.events.append((time.monotonic(), "OK"))
                self._progress.set()
                if self.pause_s:
                    await asyncio.sleep(self.pause_s)
        finally:
            await client.close()

    async def start(self) -> SteadyLoad:
        self.report.started = time.monotonic()
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        return self

    async def wait_ok(self, count: int, timeout_s: float) -> None:
        """Waits until `count` more requests succeeded (raises TimeoutError naming the failures)."""
        target = self.report.ok + count
        deadline = time.monotonic() + timeout_s
        while self.report.ok < target:
            if time.monotonic() > deadline or all(t.done() for t in self._tasks):
                raise TimeoutError(
                    f"load: {self.report.ok}/{target} successes after {timeout_s}s; "
                    f"failures {dict(self.report.failures)} {self.report.failure_details[:3]}"
                )
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), 0.2)
            except TimeoutError:
                pass

    async def stop(self) -> LoadReport:
        self._stop.set()
        if self._tasks:
            done, pending = await asyncio.wait(self._tasks, timeout=self.request_timeout_s + 5)
            for task in pending:
                task.cancel()
            for task in done:
                exc = task.exception()
                if exc is not None:
                    raise exc
        self.report.stopped = time.monotonic()
        return self.report


# ---------------------------------------------------------------------------------------------- raw calls


INFERENCE_SERVICE = "inference.GRPCInferenceService"
UNARY_METHODS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
)
STREAM_METHODS = ("ModelStreamInfer",)
WORKER_CONTROL_METHODS = ("LoadVersion", "UnloadVersion", "Drain", "GetStats")

# Statuses that say "the server broke", never acceptable as an answer to bad input.
SERVER_FAULT_CODES = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS"})


async def raw_unary(
    channel: grpc.aio.Channel,
    method: str,
    payload: bytes,
    metadata: Sequence[tuple[str, str]] = (),
    timeout_s: float = 10.0,
) -> tuple[str, str]:
    """Sends bytes as-is to a unary method; returns (status code name, details)."""
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        await call(payload, metadata=tuple(metadata) or None, timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


def raw_stream(
    channel: grpc.Channel,
    method: str,
    payloads: Sequence[bytes],
    metadata: Sequence[tuple[str, str]] = (),
    timeout_s: float = 10.0,
) -> tuple[str, str, list[bytes]]:
    """Sends byte messages on a bidi stream, half-closes, reads everything; returns (code, details, replies).

    Blocking, on a *sync* channel (run it with asyncio.to_thread): when a server ends a stream before the
    client half-closed, grpc.aio's client overwrites the server's status with INTERNAL "Internal error from
    Core" (grpc/grpc#36066); the sync client reports the status the server sent.
    """
    call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
    replies: list[bytes] = []
    try:
        for reply in call(iter(payloads), metadata=tuple(metadata) or None, timeout=timeout_s):
            replies.append(reply)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or "", replies  # type: ignore[attr-defined]
    return "OK", "", replies


def write_figures(path: Path, name: str, figures: Mapping[str, Any]) -> None:
    """Merges one test's figures into a JSON file and prints them (pytest -s shows them)."""
    data: dict[str, Any] = {}
    if path.exists():
        data = json.loads(path.read_text())
    data[name] = figures
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    print(f"\n[reliability] {name}: {json.dumps(figures, sort_keys=True, default=str)}")


# ---------------------------------------------------------------------------------------------- stack


async def fetch_table(address: str, timeout_s: float = 5.0, settings: Any = None) -> Any:
    """The router's current route table (the first message of a WatchRoutes stream)."""
    from mesh.server import open_channel
    from mesh_pb import router_pb2, router_pb2_grpc

    channel = open_channel(address, settings)
    try:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        call = stub.WatchRoutes(
            router_pb2.WatchRoutesRequest(subscriber="reliability-probe"), timeout=timeout_s
        )
        async for table in call:
            call.cancel()
            return table
        raise RuntimeError("router closed WatchRoutes without a table")
    finally:
        await channel.close()


def healthy_workers(table: Any, model: str, version: int | None = None) -> set[str]:
    """Worker ids the table lists as healthy endpoints of a model (one version, or any)."""
    out: set[str] = set()
    for route in table.models:
        if route.model != model:
            continue
        for vr in route.versions:
            if version is None or vr.version == version:
                out.update(e.worker_id for e in vr.endpoints if e.healthy)
    return out


class MeshStack:
    """Router, workers and gateway as subprocesses sharing one registry prefix and one model store."""

    def __init__(
        self,
        root: Path,
        redis_url: str,
        prefix: str,
        *,
        log_level: str = "INFO",
        worker_env: Mapping[str, str] | None = None,
        router_env: Mapping[str, str] | None = None,
        gateway_env: Mapping[str, str] | None = None,
    ) -> None:
        self.root = root
        self.redis_url = redis_url
        self.prefix = prefix
        self.store = ArtifactStore(root / "models")
        self.log_dir = root / "logs"
        self.log_level = log_level
        self.worker_env = dict(worker_env or {})
        self.router_env = dict(router_env or {})
        self.gateway_env = dict(gateway_env or {})
        self.router: ServiceProcess | None = None
        self.gateway: ServiceProcess | None = None
        self.workers: list[ServiceProcess] = []
        self._worker_count = 0

    def env(self, extra: Mapping[str, str]) -> dict[str, str]:
        return service_env(
            self.redis_url, self.prefix, self.store.root, {"MAAS_LOG_LEVEL": self.log_level, **extra}
        )

    @property
    def processes(self) -> list[ServiceProcess]:
        return [p for p in (self.router, self.gateway, *self.workers) if p is not None]

    def start_router(self, timeout_s: float = 60.0) -> ServiceProcess:
        env = self.env(
            {
                "MAAS_ROUTER_BIND": "127.0.0.1:0",
                "MAAS_ROUTER_POLL_INTERVAL_S": "0.1",
                "MAAS_ROUTER_PUBLISH_INTERVAL_S": "0.5",
                "MAAS_ROUTER_PLACEMENT_INTERVAL_S": "0.2",
                "MAAS_ROUTER_RETRY_FAILED_LOAD_S": "1.0",
                "MAAS_ROUTER_LOAD_GRACE_S": "2.0",
                **self.router_env,
            }
        )
        self.router = ServiceProcess(
            "router", "router", env, self.log_dir, ROUTER_READY, ready_in_stderr=True
        )
        return self.router.start(timeout_s)

    def restart_router(self, timeout_s: float = 60.0) -> ServiceProcess:
        """Starts the router again on the port it had (the gateways follow that address)."""
        assert self.router is not None
        address = self.router.address
        return self.router.start(timeout_s, env={"MAAS_ROUTER_BIND": address})

    def start_worker(self, timeout_s: float = 90.0) -> ServiceProcess:
        self._worker_count += 1
        env = self.env(
            {
                "MAAS_WORKER_BIND": "127.0.0.1:0",
                "MAAS_WORKER_DEVICE": "cpu",
                "MAAS_WORKER_HEARTBEAT_INTERVAL_S": "0.2",
                "MAAS_WORKER_HEARTBEAT_TTL_S": "1.5",
                "MAAS_WORKER_COMPUTE_THREADS": "1",
                "MAAS_WORKER_TORCH_THREADS": "1",
                "MAAS_WORKER_DRAIN_TIMEOUT_S": "10",
                **self.worker_env,
            }
        )
        worker = ServiceProcess(f"worker{self._worker_count}", "workers", env, self.log_dir, WORKER_READY)
        self.workers.append(worker)
        return worker.start(timeout_s)

    @staticmethod
    def worker_id(worker: ServiceProcess) -> str:
        assert worker.match is not None
        return worker.match.group(1)

    def start_gateway(self, timeout_s: float = 60.0, auth_mode: str = "required") -> ServiceProcess:
        assert self.router is not None
        env = self.env(
            {
                "MAAS_GATEWAY_BIND": "127.0.0.1:0",
                "MAAS_GATEWAY_ROUTER_ADDRESS": self.router.address,
                "MAAS_GATEWAY_METRICS_PORT": "-1",
                "MAAS_GATEWAY_AUTH_MODE": auth_mode,
                **self.gateway_env,
            }
        )
        self.gateway = ServiceProcess("gateway", "gateway", env, self.log_dir, GATEWAY_READY)
        return self.gateway.start(timeout_s)

    def all_logs(self) -> str:
        texts = []
        for path in sorted(self.log_dir.glob("*")):
            texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)

    def stop_all(self) -> None:
        for proc in [self.gateway, *self.workers, self.router]:
            if proc is not None:
                proc.stop(timeout_s=15.0)
