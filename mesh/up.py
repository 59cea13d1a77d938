"""`make up`: the whole mesh on one machine, no Docker: Redis, demo models, router, workers, gateway, compressor.

Run ``python -m mesh.up [--workers N] [--no-demo] [--bind HOST:PORT]``. Every service is a child process
(``python -m <service>``) configured by explicit environment variables; their logs stream to the
terminal prefixed by service. Ctrl-C (SIGINT) or SIGTERM stops the gateway first, then the workers
(which drain), the router, the compressor and Redis, and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.text import Text

# The variables that say where each service listens (a restarted service keeps its port).
_BIND_ENV = ("MAAS_GATEWAY_BIND", "MAAS_ROUTER_BIND", "MAAS_WORKER_BIND", "MAAS_COMPRESSOR_BIND")
# Services log "<name> listening on <host>:<port>" once bound (mesh.server.ServiceHost.start): with
# port 0 this is how the stack learns the port a child picked.
_LISTENING = re.compile(r"listening on (?P<address>[\w.\-\[\]:]+:\d+)")
# ... and "<name> metrics on http://<host>:<port>/metrics" once its Prometheus endpoint serves.
_METRICS = re.compile(r"metrics on (?P<url>http://[\w.\-\[\]:]+:\d+/metrics)")
_COLORS = ["cyan", "green", "magenta", "yellow", "blue", "bright_cyan", "bright_green", "bright_magenta"]

DEFAULT_PORTS = {"gateway": 8001, "metrics": 8002, "router": 8101, "worker": 8201, "compressor": 8301}


class StackError(RuntimeError):
    """A service did not start, or the stack could not be brought up."""


def _port_free(host: str, port: int) -> bool:
    """Whether nothing listens on host:port (a port in TIME_WAIT after a stop counts as free)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class StackConfig:
    """What to start and where. Ports are fixed by default; ``ephemeral`` binds every service to port 0."""

    workers: int = 1
    demo: bool = True
    demo_models: tuple[str, ...] = ()
    """Demo models to build; empty = all of them."""
    digits_epochs: int = 30
    """Training epochs of the digits demo model (fewer: faster private stacks for tests)."""
    gateway_bind: str = "127.0.0.1:8001"
    metrics_port: int = 8002
    host: str = "127.0.0.1"
    """Address the internal services (router, workers, compressor) bind."""
    router_port: int = 8101
    worker_base_port: int = 8201
    compressor_port: int = 8301
    router_metrics_port: int = 9101
    worker_metrics_base_port: int = 9201
    """Prometheus ports of the router and the workers, as in docker-compose.yml (ephemeral stacks:
    free ports for the workers, none for the router)."""
    ephemeral: bool = False
    compressor: bool = True
    var_dir: Path = Path("var")
    store_dir: Path | None = None
    """Artifact store; default <var_dir>/models."""
    redis_url: str | None = None
    """An existing Redis; None = an embedded server with its data under <var_dir>/redis."""
    key_prefix: str = "maas"
    log_json: bool = False
    log_level: str = "INFO"
    start_timeout_s: float = 120.0
    ready_timeout_s: float = 180.0
    """How long to wait for the demo models to become READY behind the gateway."""
    python: str = sys.executable
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    """Extra environment per service name ("gateway", "router", "worker", "compressor")."""

    @property
    def store(self) -> Path:
        return self.store_dir if self.store_dir is not None else self.var_dir / "models"

    def port(self, name: str, base: int) -> int:
        return 0 if self.ephemeral else base


LogSink = Callable[[str, str], None]


class Child:
    """One service process: its output is read on a thread, prefixed, and scanned for its bound address."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], sink: LogSink) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.sink = sink
        self.address = ""
        self.metrics_url = ""
        self.bound = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.started_at = 0.0
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self.started_at = time.monotonic()
        # A session of its own: the terminal's Ctrl-C reaches only mesh.up, which stops children in order.
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"log-{self.name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if not self.bound.is_set():
                match = _LISTENING.search(line)
                if match:
                    self.address = match.group("address")
                    self.bound.set()
            if not self.metrics_url and "metrics on http://" in line:
                found = _METRICS.search(line)
                if found:
                    self.metrics_url = found.group("url")
            self.sink(self.name, line)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def respawn(self) -> Child:
        """A new process of this service, started: same command and environment, bound to the port this
        one had (a service started on port 0 keeps its address, so whatever knows it finds it again)."""
        env = dict(self.env)
        if self.address:
            port = self.address.rsplit(":", 1)[1]
            for key in _BIND_ENV:
                bind = env.get(key, "")
                if bind.endswith(":0"):
                    env[key] = f"{bind[:-2]}:{port}"
        if self.metrics_url:  # and its Prometheus endpoint, where scrapers look for it
            metrics_port = str(urlsplit(self.metrics_url).port)
            for key, value in env.items():
                if key.endswith("_METRICS_PORT") and value in ("0", "-1"):
                    env[key] = metrics_port
        child = Child(self.name, self.argv, env, self.sink)
        child.address = self.address
        child.metrics_url = self.metrics_url
        if self.address:
            child.bound.set()
        child.start()
        return child

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def terminate(self) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> int | None:
        if self.proc is None:
            return None
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.sink(self.name, f"did not stop within {timeout_s:.0f} s; killing it")
            self.proc.kill()
            code = self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=2)
        return code


def wait_healthy(address: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Polls grpc.health.v1 at address until it answers SERVING; StackError on timeout or a dead child."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if not alive():
                raise StackError(f"{address}: the process exited before it was healthy")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise StackError(f"{address}: not SERVING after {timeout_s:.0f} s")
            time.sleep(0.1)


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    # Children inherit the signal mask. Redis shares mesh.up's process group (EmbeddedRedis starts it),
    # so a Ctrl-C or a SIGTERM sent to the whole group would stop it before the services that still
    # write to it; started with those signals blocked, it stays up until the stack SHUTDOWNs it last.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Stack:
    """Starts and stops the services of one mesh. Used by `make up`, `maas bench all` and the tests."""

    def __init__(
        self, config: StackConfig, console: Console | None = None, sink: LogSink | None = None
    ) -> None:
        self.config = config
        self.console = console or Console(highlight=False)
        self.sink: LogSink = sink or self._print_line
        self.redis_url = config.redis_url or ""
        self._redis: object | None = None
        self.redis_started_at = 0.0
        self._redis_down = False
        self.children: list[Child] = []
        self.gateway: Child | None = None
        self.router: Child | None = None
        self.workers: list[Child] = []
        self.compressor: Child | None = None
        self.metrics_port = config.metrics_port
        self._colors: dict[str, str] = {}
        self._print_lock = threading.Lock()
        self.crashed: list[tuple[str, int]] = []
        self._lock: IO[str] | None = None

    # ---- logs ---------------------------------------------------------------------------------------
    def _print_line(self, name: str, line: str) -> None:
        color = self._colors.setdefault(name, _COLORS[len(self._colors) % len(_COLORS)])
        text = Text()
        text.append(f"{name:<11}│ ", style=color)
        text.append(line)
        with self._print_lock:
            self.console.print(text, soft_wrap=True)

    def info(self, message: str) -> None:
        self.sink("mesh.up", message)

    # ---- environment --------------------------------------------------------------------------------
    def _base_env(self) -> dict[str, str]:
        cfg = self.config
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
        env.update(
            {
                "MAAS_REDIS_URL": self.redis_url,
                "MAAS_KEY_PREFIX": cfg.key_prefix,
                "MAAS_VAR_DIR": str(cfg.var_dir.resolve()),
                "MAAS_STORE_DIR": str(cfg.store.resolve()),
                "MAAS_LOG_JSON": "true" if cfg.log_json else "false",
                "MAAS_LOG_LEVEL": cfg.log_level,
                "PYTHONUNBUFFERED": "1",
            }
        )
        # TLS between services is carried over from the caller's environment when set.
        for key in ("MAAS_TLS_CERT_FILE", "MAAS_TLS_KEY_FILE", "MAAS_TLS_CA_FILE"):
            if os.environ.get(key):
                env[key] = os.environ[key]
        return env

    def _env(self, service: str, own: dict[str, str]) -> dict[str, str]:
        env = self._base_env()
        env.update(own)
        env.update(self.config.service_env.get(service, {}))
        return env

    def _spawn(self, name: str, module: str, env: dict[str, str]) -> Child:
        child = Child(name, [self.config.python, "-m", module], env, self.sink)
        child.start()
        self.children.append(child)
        self._write_pids()
        return child

    def _write_pids(self) -> None:
        # For operators and tests: every child pid (Redis included), one "name pid" a line.
        path = self.config.var_dir / "up.pids"
        lines = [f"{c.name} {c.pid}" for c in self.children]
        proc = getattr(self._redis, "proc", None)
        if proc is not None:
            lines.insert(0, f"redis {proc.pid}")
        path.write_text("\n".join(lines) + "\n")

    def _await_child(self, child: Child, expected: str) -> str:
        """Waits for the child to report its address (port 0) and to answer SERVING; returns host:port."""
        timeout = self.config.start_timeout_s
        if not expected.endswith(":0"):
            address = expected
        else:
            deadline = time.monotonic() + timeout
            while not child.bound.wait(0.1):
                if child.poll() is not None:
                    raise StackError(f"{child.name} exited with code {child.poll()} before listening")
                if time.monotonic() > deadline:
                    raise StackError(f"{child.name} did not report a listening address in {timeout:.0f} s")
            address = child.address
        host, port = address.rsplit(":", 1)
        if host in ("0.0.0.0", "[::]", "::", ""):
            address = f"127.0.0.1:{port}"
        wait_healthy(address, timeout, alive=lambda: child.poll() is None)
        child.address = address
        return address

    # ---- start --------------------------------------------------------------------------------------
    def start_redis(self) -> None:
        if self.redis_url:
            return
        from mesh.redis_embed import EmbeddedRedis

        es = EmbeddedRedis(self.config.var_dir / "redis", persist=True)
        with _stop_signals_blocked():
            self.redis_url = es.start()
        self._redis = es
        self.redis_started_at = time.monotonic()
        self.info(f"embedded redis at {self.redis_url} (appendonly, data in {es.data_dir})")

    def demo_names(self) -> list[str]:
        from workers.demo import DEMO_MODELS

        return list(self.config.demo_models) or list(DEMO_MODELS)

    def build_demo(self) -> None:
        """Builds and registers the demo models that have no live demo version yet (progress on the terminal)."""
        import asyncio

        from mesh.registry import Registry
        from mesh.store import ArtifactStore
        from workers.demo import build_demo

        names = self.demo_names()
        cfg = self.config

        async def run(progress: Callable[[str], None]) -> None:
            registry = await Registry.connect(self.redis_url, cfg.key_prefix)
            try:
                await build_demo(
                    registry,
                    ArtifactStore(cfg.store),
                    names=names,
                    progress=progress,
                    digits_epochs=cfg.digits_epochs,
                    # With two workers or more, each demo version lives on two: when one worker dies,
                    # the gateway retries its requests on the other and nothing fails.
                    min_replicas=min(2, max(1, cfg.workers)),
                )
            finally:
                await registry.close()

        with self.console.status(f"demo models: {', '.join(names)}") as status:

            def progress(message: str) -> None:
                status.update(message)
                self.sink("demo", message)

            asyncio.run(run(progress))

    def start_router(self) -> str:
        cfg = self.config
        bind = f"{cfg.host}:{cfg.port('router', cfg.router_port)}"
        env = {
            "MAAS_ROUTER_BIND": bind,
            "MAAS_ROUTER_METRICS_PORT": "0" if cfg.ephemeral else str(cfg.router_metrics_port),
        }
        self.router = self._spawn("router", "router", self._env("router", env))
        return self._await_child(self.router, bind)

    def start_workers(self) -> list[str]:
        cfg = self.config
        spawned = []
        for i in range(cfg.workers):
            port = cfg.port("worker", cfg.worker_base_port + i)
            bind = f"{cfg.host}:{port}"
            env = {
                "MAAS_WORKER_BIND": bind,
                "MAAS_WORKER_WORKER_ID": f"worker-{i}",
                "MAAS_WORKER_METRICS_PORT": "-1" if cfg.ephemeral else str(cfg.worker_metrics_base_port + i),
            }
            spawned.append((self._spawn(f"worker-{i}", "workers", self._env("worker", env)), bind))
        addresses = [self._await_child(child, bind) for child, bind in spawned]
        self.workers = [child for child, _ in spawned]
        return addresses

    def start_gateway(self) -> str:
        self.gateway = self.spawn_gateway()
        return self.gateway.address

    def spawn_gateway(self, extra_env: dict[str, str] | None = None) -> Child:
        """Starts a gateway (another one too: benchmarks compare settings side by side) and waits for it."""
        cfg = self.config
        assert self.router is not None
        env = {
            "MAAS_GATEWAY_BIND": cfg.gateway_bind
            if not cfg.ephemeral
            else f"{cfg.gateway_bind.rsplit(':', 1)[0]}:0",
            "MAAS_GATEWAY_METRICS_PORT": str(0 if cfg.ephemeral else cfg.metrics_port),
            "MAAS_GATEWAY_ROUTER_ADDRESS": self.router.address,
        }
        child = self._spawn("gateway", "gateway", {**self._env("gateway", env), **(extra_env or {})})
        self._await_child(child, env["MAAS_GATEWAY_BIND"])
        return child

    def start_compressor(self) -> str:
        cfg = self.config
        assert self.router is not None
        bind = f"{cfg.host}:{cfg.port('compressor', cfg.compressor_port)}"
        env = {"MAAS_COMPRESSOR_BIND": bind}
        self.compressor = self._spawn("compressor", "compressor", self._env("compressor", env))
        return self._await_child(self.compressor, bind)

    def _claim(self) -> None:
        """Refuses to start a second stack on this var dir, or one whose fixed ports are taken: it would
        share the first one's Redis files, and its services, failing to bind, would find the first
        stack's services answering on their ports and report a mesh that is not theirs."""
        cfg = self.config
        lock_path = cfg.var_dir / "up.lock"
        lock = lock_path.open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise StackError(
                f"another mesh.up (pid {holder}) runs on {cfg.var_dir}: stop it (Ctrl-C) first, or give "
                "this one its own --var-dir and --ephemeral-ports"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock  # held for this process's life
        if cfg.ephemeral:
            return
        ports = {"gateway": int(cfg.gateway_bind.rsplit(":", 1)[1]), "router": cfg.router_port}
        if cfg.metrics_port > 0:
            ports["gateway metrics"] = cfg.metrics_port
        if cfg.router_metrics_port > 0:
            ports["router metrics"] = cfg.router_metrics_port
        for i in range(cfg.workers):
            ports[f"worker-{i}"] = cfg.worker_base_port + i
            if cfg.worker_metrics_base_port > 0:
                ports[f"worker-{i} metrics"] = cfg.worker_metrics_base_port + i
        if cfg.compressor:
            ports["compressor"] = cfg.compressor_port
        taken = [f"{port} ({name})" for name, port in ports.items() if not _port_free(cfg.host, port)]
        if taken:
            raise StackError(
                f"port(s) {', '.join(taken)} already in use on {cfg.host}: another mesh or service holds "
                "them; stop it, or run with --ephemeral-ports"
            )

    def start(self) -> None:
        """Brings everything up in dependency order; on any failure stops what started and raises."""
        cfg = self.config
        cfg.var_dir.mkdir(parents=True, exist_ok=True)
        cfg.store.mkdir(parents=True, exist_ok=True)
        self._claim()
        try:
            self.start_redis()
            if cfg.demo:
                self.build_demo()
            self.start_router()
            self.start_workers()
            self.start_gateway()
            if cfg.compressor:
                self.start_compressor()
            if cfg.demo:
                self.wait_models_ready()
            self.write_endpoints()
        except BaseException:
            self.stop()
            raise

    def wait_models_ready(self) -> None:
        """Waits until every demo model answers ModelReady through the gateway (placed and loaded)."""
        import tritonclient.grpc as grpcclient

        assert self.gateway is not None
        names = self.demo_names()
        client = grpcclient.InferenceServerClient(self.gateway.address)
        deadline = time.monotonic() + self.config.ready_timeout_s
        pending = set(names)
        try:
            while pending:
                for name in sorted(pending):
                    with contextlib.suppress(Exception):
                        if client.is_model_ready(name):
                            pending.discard(name)
                if not pending:
                    break
                if time.monotonic() > deadline:
                    raise StackError(
                        f"models not ready after {self.config.ready_timeout_s:.0f} s: {sorted(pending)}"
                    )
                time.sleep(0.25)
        finally:
            client.close()

    # ---- run / stop ---------------------------------------------------------------------------------
    def check_children(self) -> list[tuple[Child, int]]:
        """Children that exited on their own since the last call (child, exit code)."""
        gone = []
        for child in self.children:
            code = child.poll()
            if code is not None and not child.stopping:
                child.stopping = True
                gone.append((child, code))
                self.crashed.append((child.name, code))
        return gone

    def redis_exited(self) -> int | None:
        """The embedded Redis's exit code, once, when it died on its own (None while it runs)."""
        es = self._redis
        proc = getattr(es, "proc", None)
        if proc is None or self._redis_down:
            return None
        code = proc.poll()
        if code is not None:
            self._redis_down = True
            self.crashed.append(("redis", code))
        return code

    def restart_redis(self) -> None:
        """Starts the embedded Redis again on its socket and data (its append-only file is replayed)."""
        from mesh.redis_embed import EmbeddedRedis

        es = self._redis
        assert isinstance(es, EmbeddedRedis)
        with _stop_signals_blocked():
            es.start()
        self.redis_started_at = time.monotonic()
        self._redis_down = False
        self._write_pids()

    def restart(self, old: Child) -> Child:
        """Starts a crashed service again in place of `old` (same command, environment and port)."""
        old.wait(5.0)  # reap it and let its log reader finish
        new = old.respawn()
        self.children[self.children.index(old)] = new
        for attr in ("gateway", "router", "compressor"):
            if getattr(self, attr) is old:
                setattr(self, attr, new)
        self.workers = [new if c is old else c for c in self.workers]
        self._write_pids()
        return new

    def stop(self, grace_s: float = 20.0) -> None:
        """Gateway first (no new traffic), then workers (drain), router, compressor, finally Redis."""
        order: list[list[Child]] = [
            [c for c in self.children if c.name == "gateway"],
            [c for c in self.children if c.name.startswith("worker")],
            [c for c in self.children if c.name == "router"],
            [c for c in self.children if c.name == "compressor"],
        ]
        for group in order:
            for child in group:
                child.terminate()
            for child in group:
                child.wait(grace_s)
        (self.config.var_dir / "up.json").unlink(missing_ok=True)
        if self._redis is not None:
            self._stop_redis()
            self._redis = None
        if self._lock is not None:  # the var dir is free for the next stack
            self._lock.close()
            self._lock = None

    def _stop_redis(self) -> None:
        """SHUTDOWN (flushes the append-only file), then reap; the blocked signals cannot stop it."""
        import redis

        from mesh.redis_embed import EmbeddedRedis

        es = self._redis
        assert isinstance(es, EmbeddedRedis)
        if es.proc is not None and es.proc.poll() is None:
            try:
                client = redis.Redis.from_url(self.redis_url, socket_timeout=10)
                client.shutdown()
            except redis.RedisError as exc:
                self.info(f"redis SHUTDOWN failed ({exc}); killing it")
                es.proc.kill()
            try:
                es.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                es.proc.kill()
        es.stop()

    def write_endpoints(self) -> Path:
        """Writes <var_dir>/up.json (service -> address) once the stack is ready; removed on stop."""
        import json

        path = self.config.var_dir / "up.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.endpoints(), indent=2) + "\n")
        tmp.replace(path)
        return path

    def endpoints(self) -> dict[str, str]:
        out = {"redis": self.redis_url}
        if self.gateway is not None:
            out["gateway"] = self.gateway.address
        if self.router is not None:
            out["router"] = self.router.address
        for child in self.workers:
            out[child.name] = child.address
        if self.compressor is not None:
            out["compressor"] = self.compressor.address
        children = [self.gateway, self.router, *self.workers, self.compressor]
        for child in [c for c in children if c is not None and c.metrics_url]:
            out[f"{child.name}-metrics"] = child.metrics_url
        return out


class Restarts:
    """When crashed services start again, as a process supervisor would (compose's `restart:
    unless-stopped` does the same for the containers): after `base_s`, doubling up to `max_s` while a
    service keeps crashing within `stable_s` of its start; one that ran `stable_s` waits `base_s` again."""

    def __init__(
        self,
        base_s: float = 1.0,
        max_s: float = 30.0,
        stable_s: float = 60.0,
        report: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.report = report
        self.base_s = base_s
        self.max_s = max_s
        self.stable_s = stable_s
        self._due: list[tuple[float, str, Callable[[], object]]] = []
        self._delay: dict[str, float] = {}

    def crashed(self, name: str, started_at: float, restart: Callable[[], object]) -> float:
        """Schedules `restart` of the service `name` (started at `started_at`); returns the delay."""
        now = time.monotonic()
        previous = self._delay.get(name, 0.0)
        quick = previous and now - started_at < self.stable_s
        delay = min(self.max_s, previous * 2) if quick else self.base_s
        self._delay[name] = delay
        self._due.append((now + delay, name, restart))
        return delay

    @property
    def pending(self) -> bool:
        """Whether a restart is still waiting for its delay (or to be tried again)."""
        return bool(self._due)

    def due(self) -> list[tuple[str, object]]:
        """Runs the restarts whose delay is over: (name, what the restart returned) for each that
        worked; one that failed is scheduled again, later."""
        now = time.monotonic()
        ready = [item for item in self._due if item[0] <= now]
        self._due = [item for item in self._due if item[0] > now]
        done = []
        for _, name, restart in ready:
            try:
                done.append((name, restart()))
            except Exception as exc:
                delay = self.crashed(name, now, restart)
                self.report(f"restarting {name} failed ({exc}); trying again in {delay:.0f} s")
        return done


def _summary(stack: Stack) -> None:
    from rich.panel import Panel
    from rich.syntax import Syntax
    from rich.table import Table

    eps = stack.endpoints()
    table = Table(title="MaaS mesh is up", show_header=True, header_style="bold")
    table.add_column("service")
    table.add_column("endpoint")
    table.add_row("gateway (KServe v2 gRPC)", eps.get("gateway", "-"))
    services = ["gateway", "router", *[c.name for c in stack.workers], "compressor"]
    for key in [k for name in services for k in (name, f"{name}-metrics")] + ["redis"]:
        if key in eps and key != "gateway":
            table.add_row(key, eps[key])
    stack.console.print(table)
    url = eps.get("gateway", "127.0.0.1:8001")
    snippet = f"""import numpy as np
import tritonclient.grpc as grpcclient

client = grpcclient.InferenceServerClient("{url}")
data = np.random.randint(0, 17, (1, 64)).astype(np.float32)
pixels = grpcclient.InferInput("pixels", [1, 64], "FP32")
pixels.set_data_from_numpy(data)
result = client.infer("digits", [pixels])
print(result.as_numpy("logits").argmax(axis=1))"""
    stack.console.print(Panel(Syntax(snippet, "python", theme="ansi_dark"), title="tritonclient"))
    stack.console.print(f"or: maas infer digits --random --url {url}    ·    Ctrl-C stops the mesh")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m mesh.up", description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=int(env.get("WORKERS", "1")), help="worker processes")
    parser.add_argument("--no-demo", action="store_true", help="skip building/registering the demo models")
    parser.add_argument(
        "--demo-models", default="", help="comma-separated demo models to build (default: all)"
    )
    parser.add_argument(
        "--bind",
        default="127.0.0.1:8001",
        help="gateway public address; a non-loopback host requires API keys",
    )
    parser.add_argument(
        "--digits-epochs", type=int, default=30, help="training epochs of the digits demo model"
    )
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument(
        "--ephemeral-ports",
        action="store_true",
        help="bind every service to a free port (private stacks: tests, benchmarks)",
    )
    parser.add_argument("--var-dir", type=Path, default=Path(env.get("MAAS_VAR_DIR", "var")))
    parser.add_argument("--no-compressor", action="store_true", help="do not start the compressor")
    parser.add_argument("--json-logs", action="store_true", help="keep the services' JSON log lines")
    parser.add_argument(
        "--no-restart", action="store_true", help="leave a crashed service stopped (default: start it again)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    config = StackConfig(
        workers=args.workers,
        demo=not args.no_demo,
        demo_models=tuple(m for m in args.demo_models.split(",") if m),
        digits_epochs=args.digits_epochs,
        gateway_bind=args.bind,
        metrics_port=args.metrics_port,
        ephemeral=args.ephemeral_ports,
        compressor=not args.no_compressor,
        var_dir=args.var_dir,
        store_dir=Path(os.environ["MAAS_STORE_DIR"]) if os.environ.get("MAAS_STORE_DIR") else None,
        redis_url=os.environ.get("MAAS_REDIS_URL") or None,
        key_prefix=os.environ.get("MAAS_KEY_PREFIX", "maas"),
        log_json=args.json_logs,
    )
    stack = Stack(config)
    stop = threading.Event()
    received: list[str] = []
    starting = True

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()
        if starting and len(received) == 1:
            # Interrupts a startup wait; Stack.start stops whatever already runs.
            raise KeyboardInterrupt

    for sig in _STOP_SIGNALS:
        signal.signal(sig, on_signal)
    try:
        stack.start()
    except StackError as exc:
        stack.console.print(f"[bold red]mesh.up: {exc}[/]")
        return 1
    except KeyboardInterrupt:
        stack.info(f"{received[0] if received else 'SIGINT'} received during startup; stopped")
        return 0
    starting = False
    _summary(stack)
    restarts = Restarts(report=stack.info) if not args.no_restart else None

    def crashed(name: str, code: int, started_at: float, restart: Callable[[], object]) -> None:
        then = ""
        if restarts is not None:
            then = f"; restarting it in {restarts.crashed(name, started_at, restart):.0f} s"
        stack.console.print(f"[bold red]mesh.up: {name} exited unexpectedly with code {code}{then}[/]")

    while not stop.wait(0.5):
        for child, code in stack.check_children():
            crashed(child.name, code, child.started_at, partial(stack.restart, child))
        redis_code = stack.redis_exited()
        if redis_code is not None:
            crashed("redis", redis_code, stack.redis_started_at, stack.restart_redis)
        if restarts is not None:
            for name, new in restarts.due():
                where = f"pid {new.pid}, {new.address}" if isinstance(new, Child) else stack.redis_url
                stack.info(f"{name} restarted ({where})")
    stack.info(
        f"{received[0] if received else 'stop'} received: stopping gateway, workers, router, compressor, redis"
    )
    stack.stop()
    stack.info("stopped")
    # 1: a service crashed and was not running again when the stack stopped.
    unrecovered = stack.crashed and (restarts is None or restarts.pending)
    return 1 if unrecovered else 0


if __name__ == "__main__":
    sys.exit(main())
