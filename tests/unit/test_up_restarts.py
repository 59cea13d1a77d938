"""mesh.up's supervision: when a crashed service starts again, on which ports, and what it refuses."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

from mesh.up import Child, Restarts, Stack, StackConfig, StackError


def test_delay_doubles_while_a_service_keeps_crashing_and_resets_once_it_ran() -> None:
    restarts = Restarts(base_s=1.0, max_s=5.0, stable_s=60.0)
    ago = time.monotonic() - 2.0
    assert restarts.crashed("worker-0", ago, lambda: None) == 1.0
    assert restarts.crashed("worker-0", ago, lambda: None) == 2.0
    assert restarts.crashed("worker-0", ago, lambda: None) == 4.0
    assert restarts.crashed("worker-0", ago, lambda: None) == 5.0  # capped
    assert restarts.crashed("router", ago, lambda: None) == 1.0  # per service
    assert (
        restarts.crashed("worker-0", time.monotonic() - 120.0, lambda: None) == 1.0
    )  # it had run long enough


def test_due_runs_only_what_waited_its_delay_and_retries_a_failed_restart() -> None:
    started: list[str] = []
    reports: list[str] = []
    restarts = Restarts(base_s=0.0, report=reports.append)
    restarts.crashed("gateway", time.monotonic(), lambda: started.append("gateway") or "new")
    assert restarts.pending
    assert restarts.due() == [("gateway", "new")] and started == ["gateway"]
    assert not restarts.pending
    assert restarts.due() == []

    def broken() -> None:
        raise RuntimeError("port in use")

    restarts.crashed("redis", time.monotonic(), broken)
    assert restarts.due() == [] and restarts.pending  # scheduled again
    assert reports and "restarting redis failed (port in use)" in reports[0]
    slow = Restarts(base_s=60.0)
    slow.crashed("router", time.monotonic(), lambda: started.append("router"))
    assert slow.due() == [] and started == ["gateway"]


def test_a_respawned_service_binds_the_port_it_had() -> None:
    child = Child(
        "worker-0",
        [sys.executable, "-c", "pass"],
        {"MAAS_WORKER_BIND": "127.0.0.1:0", "OTHER": "x"},
        lambda name, line: None,
    )
    child.address = "127.0.0.1:40123"
    new = child.respawn()
    try:
        assert new.env["MAAS_WORKER_BIND"] == "127.0.0.1:40123" and new.env["OTHER"] == "x"
        assert new.address == "127.0.0.1:40123" and new.pid and new.pid != child.pid
    finally:
        new.wait(10.0)
    fixed = Child("gateway", [sys.executable, "-c", "pass"], {"MAAS_GATEWAY_BIND": "0.0.0.0:8001"}, print)
    fixed.address = "127.0.0.1:8001"
    again = fixed.respawn()
    try:
        assert again.env["MAAS_GATEWAY_BIND"] == "0.0.0.0:8001"  # a fixed bind is kept as it was
    finally:
        again.wait(10.0)


def test_a_respawned_service_keeps_its_metrics_port() -> None:
    # A Prometheus scrape target must survive a restart, as the gRPC address does: the port a service
    # picked is read from its log line and pinned for the new process.
    lines = 'print("worker listening on 127.0.0.1:40123"); print("worker metrics on http://127.0.0.1:40999/metrics")'
    child = Child(
        "worker-0",
        [sys.executable, "-c", lines],
        {"MAAS_WORKER_BIND": "127.0.0.1:0", "MAAS_WORKER_METRICS_PORT": "-1"},
        lambda name, line: None,
    )
    child.start()
    assert child.wait(10.0) == 0
    deadline = time.monotonic() + 10
    while not child.metrics_url and time.monotonic() < deadline:
        time.sleep(0.01)
    assert child.address == "127.0.0.1:40123"
    assert child.metrics_url == "http://127.0.0.1:40999/metrics"
    new = child.respawn()
    try:
        assert new.env["MAAS_WORKER_METRICS_PORT"] == "40999"
        assert new.env["MAAS_WORKER_BIND"] == "127.0.0.1:40123"
        assert new.metrics_url == child.metrics_url
    finally:
        new.wait(10.0)
    off = Child("router", [sys.executable, "-c", "pass"], {"MAAS_ROUTER_METRICS_PORT": "0"}, print)
    again = off.respawn()  # no metrics line was seen: nothing to pin, metrics stay off
    try:
        assert again.env["MAAS_ROUTER_METRICS_PORT"] == "0"
    finally:
        again.wait(10.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_second_stack_on_one_var_dir_is_refused(tmp_path: Path) -> None:
    # Two `make up` on one checkout would share one Redis's files, and the second's services, failing to
    # bind, would find the first's answering on their ports.
    first = Stack(StackConfig(var_dir=tmp_path, ephemeral=True))
    first._claim()
    second = Stack(StackConfig(var_dir=tmp_path, ephemeral=True))
    with pytest.raises(StackError, match=rf"another mesh.up \(pid {os.getpid()}\) runs on"):
        second.start()
    first.stop()  # releases the var dir
    second._claim()
    second.stop()


def test_taken_ports_are_named_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        config = StackConfig(
            var_dir=tmp_path,
            gateway_bind=f"127.0.0.1:{_free_port()}",
            metrics_port=_free_port(),
            router_port=taken,
            router_metrics_port=_free_port(),
            worker_base_port=_free_port(),
            worker_metrics_base_port=_free_port(),
            compressor=False,
        )
        stack = Stack(config)
        with pytest.raises(StackError, match=rf"port\(s\) {taken} \(router\) already in use"):
            stack.start()
    assert not (tmp_path / "redis").exists()  # nothing was started
