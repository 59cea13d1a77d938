"""mesh.up's restart policy: when a crashed service starts again, and on which port."""

from __future__ import annotations

import sys
import time
from typing import Any

from mesh.up import Child, Restarts


class _Recorder:
    """Stands in for Stack.restart: records what would be started again."""

    def __init__(self) -> None:
        self.restarted: list[Child] = []

    def restart(self, old: Child) -> Child:
        self.restarted.append(old)
        return old


def _child(name: str, ran_s: float) -> Child:
    child = Child(name, [sys.executable, "-c", "pass"], {}, lambda name, line: None)
    child.started_at = time.monotonic() - ran_s
    return child


def test_delay_doubles_while_a_service_keeps_crashing_and_resets_once_it_ran() -> None:
    stack: Any = _Recorder()
    restarts = Restarts(stack, base_s=1.0, max_s=5.0, stable_s=60.0)
    assert restarts.crashed(_child("worker-0", ran_s=2.0)) == 1.0
    assert restarts.crashed(_child("worker-0", ran_s=2.0)) == 2.0
    assert restarts.crashed(_child("worker-0", ran_s=2.0)) == 4.0
    assert restarts.crashed(_child("worker-0", ran_s=2.0)) == 5.0  # capped
    assert restarts.crashed(_child("router", ran_s=2.0)) == 1.0  # per service
    assert restarts.crashed(_child("worker-0", ran_s=120.0)) == 1.0  # it had run long enough


def test_due_restarts_only_what_waited_its_delay() -> None:
    stack: Any = _Recorder()
    restarts = Restarts(stack, base_s=0.0)
    first = _child("gateway", ran_s=1.0)
    restarts.crashed(first)
    assert restarts.due() == [first] and stack.restarted == [first]
    assert restarts.due() == []
    slow = Restarts(stack, base_s=60.0)
    slow.crashed(_child("router", ran_s=1.0))
    assert slow.due() == []


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
