"""`python -m mesh.up` end to end (private ports, Redis and var dir), and the containers' health probe."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _pids(var: Path) -> dict[str, int]:
    path = var / "up.pids"
    if not path.exists():
        return {}
    return {
        name: int(pid)
        for name, pid in (line.split() for line in path.read_text().splitlines() if line.strip())
    }


@pytest.fixture
def var_dir() -> Iterator[Path]:
    # Short: the embedded Redis puts its unix socket under it.
    path = Path(tempfile.mkdtemp(prefix="maas-up-"))
    try:
        yield path
    finally:
        for pid in _pids(path).values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_up_serves_digits_restarts_killed_services_and_stops_on_sigint(var_dir: Path) -> None:
    import torch
    import tritonclient.grpc as grpcclient

    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mesh.up",
            "--workers",
            "1",
            "--ephemeral-ports",
            "--var-dir",
            str(var_dir),
            "--demo-models",
            "digits",
            "--digits-epochs",
            "3",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        endpoints_file = var_dir / "up.json"
        while not endpoints_file.exists():
            assert proc.poll() is None, "mesh.up exited early:\n" + "".join(lines[-40:])
            assert time.monotonic() < deadline, "stack not up in 90 s:\n" + "".join(lines[-40:])
            time.sleep(0.2)
        endpoints = json.loads(endpoints_file.read_text())
        gateway = endpoints["gateway"]
        assert not gateway.endswith(":8001")
        assert set(_pids(var_dir)) >= {"redis", "router", "worker-0", "gateway", "compressor"}

        pixels = np.random.default_rng(0).integers(0, 17, (3, 64)).astype(np.float32)
        client = grpcclient.InferenceServerClient(gateway)
        try:
            tensor = grpcclient.InferInput("pixels", [3, 64], "FP32")
            tensor.set_data_from_numpy(pixels)
            result = client.infer("digits", [tensor], client_timeout=30)
            logits = result.as_numpy("logits")
        finally:
            client.close()

        # Reference: the registered artifact, run here with torch.
        (artifact,) = (var_dir / "models" / "digits").rglob("model.pt2")
        module = torch.export.load(str(artifact)).module()
        with torch.inference_mode():
            expected = module(torch.from_numpy(pixels)).numpy()
        assert logits is not None and logits.shape == (3, 10)
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)

        # A worker killed with SIGKILL is started again on its port; the version comes back behind the gateway.
        killed = _pids(var_dir)["worker-0"]
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while _pids(var_dir).get("worker-0") in (None, killed):
            assert time.monotonic() < deadline, "worker not restarted:\n" + "".join(lines[-40:])
            time.sleep(0.2)
        assert json.loads(endpoints_file.read_text())["worker-0"] == endpoints["worker-0"]
        client = grpcclient.InferenceServerClient(gateway)
        try:
            while True:
                try:
                    again = client.infer("digits", [tensor], client_timeout=30).as_numpy("logits")
                    break
                except grpcclient.InferenceServerException:
                    assert time.monotonic() < deadline, "digits not served again:\n" + "".join(lines[-40:])
                    time.sleep(0.5)
        finally:
            client.close()
        np.testing.assert_allclose(again, expected, rtol=1e-4, atol=1e-4)
        assert any("worker-0 exited unexpectedly" in line and "restarting it" in line for line in lines)

        # The embedded Redis killed with SIGKILL starts again on its socket, with the registry's data.
        killed = _pids(var_dir)["redis"]
        os.kill(killed, signal.SIGKILL)
        while _pids(var_dir).get("redis") in (None, killed):
            assert time.monotonic() < deadline + 30, "redis not restarted:\n" + "".join(lines[-40:])
            time.sleep(0.2)

        async def digits_registered() -> int:
            from mesh.registry import Registry

            registry = await Registry.connect(endpoints["redis"], "maas")
            try:
                return len(await registry.list_versions("digits"))
            finally:
                await registry.close()

        assert asyncio.run(digits_registered()) >= 1

        children = _pids(var_dir)
        proc.send_signal(signal.SIGINT)
        # Exit status 0: the services that crashed were running again when the stack stopped.
        assert proc.wait(timeout=60) == 0, "".join(lines[-40:])
        reader.join(timeout=5)
        still = {name: pid for name, pid in children.items() if _alive(pid)}
        assert not still, f"children left running: {still}"
        assert any("stopped" in line for line in lines[-10:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_health_probe_script() -> None:
    """deploy/healthcheck.py (the compose healthcheck) against a real ServiceHost: SERVING, then not."""
    from mesh.server import ServiceHost

    host = ServiceHost("probe-test")
    port = await host.start("127.0.0.1:0")
    script = str(ROOT / "deploy" / "healthcheck.py")
    try:
        ok = await asyncio.create_subprocess_exec(sys.executable, script, f"127.0.0.1:{port}")
        assert await asyncio.wait_for(ok.wait(), 30) == 0
        await host.set_serving(False)
        down = await asyncio.create_subprocess_exec(
            sys.executable, script, f"127.0.0.1:{port}", stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(down.communicate(), 30)
        assert down.returncode == 1 and b"NOT_SERVING" in err
    finally:
        await host.stop(0)


async def test_closed_loop_against_echo() -> None:
    """The benchmark harness: closed-loop load through tritonclient aio against the bare echo server."""
    import grpc.aio
    import tritonclient.grpc.aio as aioclient

    from mesh.benchtools.echo import EchoServicer
    from mesh.benchtools.load import closed_loop
    from mesh.benchtools.targets import WORKLOADS, infer_call
    from mesh.server import GRPC_OPTIONS
    from mesh.v2 import pb_grpc

    server = grpc.aio.server(options=GRPC_OPTIONS)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(EchoServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = aioclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        workload = WORKLOADS["echo"]
        call = infer_call(client, workload)
        reply = await call()
        np.testing.assert_array_equal(reply.as_numpy("pixels"), workload.data(1))  # type: ignore[attr-defined]
        result = await closed_loop(call, 2, duration_s=0.3, warmup_s=0.05, max_requests=200)
        assert result.errors == 0 and 0 < result.requests <= 201
        assert result.rps > 0 and result.p50_ms <= result.p99_ms
    finally:
        await client.close()
        await server.stop(0)


@pytest.mark.parametrize("mode", ["stream", "unary"])
async def test_bare_proxy_in_front_of_echo(mode: str) -> None:
    """The benchmark's hop floor: a bare proxy (one call per request, or multiplexed on one stream)
    forwards ModelInfer to the echo; what comes back is the echo's answer, request id included."""
    import grpc.aio
    import tritonclient.grpc.aio as aioclient

    from mesh.benchtools.echo import EchoFrames, EchoServicer, ProxyServicer
    from mesh.benchtools.targets import WORKLOADS
    from mesh.server import GRPC_OPTIONS
    from mesh.v2 import pb_grpc
    from mesh_pb import worker_pb2_grpc

    servers = []
    echo = grpc.aio.server(options=GRPC_OPTIONS)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(EchoServicer(), echo)
    worker_pb2_grpc.add_WorkerInferenceServicer_to_server(EchoFrames(), echo)
    echo_port = echo.add_insecure_port("127.0.0.1:0")
    await echo.start()
    servers.append(echo)
    proxy = grpc.aio.server(options=GRPC_OPTIONS)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(ProxyServicer(f"127.0.0.1:{echo_port}", mode), proxy)
    proxy_port = proxy.add_insecure_port("127.0.0.1:0")
    await proxy.start()
    servers.append(proxy)
    client = aioclient.InferenceServerClient(f"127.0.0.1:{proxy_port}")
    try:
        workload = WORKLOADS["echo"]
        x = workload.data(3)
        inp = aioclient.InferInput("pixels", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        results = await asyncio.gather(*(client.infer("echo", [inp], request_id=f"r{i}") for i in range(8)))
        for i, result in enumerate(results):
            np.testing.assert_array_equal(result.as_numpy("pixels"), x)
            assert result.get_response().id == f"r{i}"
    finally:
        await client.close()
        for server in servers:
            await server.stop(0)
