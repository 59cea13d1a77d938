"""Transport security: TLS on the gateway's public port, mTLS between the mesh's services (gateway →
router, gateway → worker, router → worker), with certificates generated here (trustme).

Settings model (mesh/server.py): a service with `tls_cert_file` + `tls_key_file` serves TLS; with
`tls_ca_file` too it requires client certificates chaining to that CA (mTLS), and its own outgoing
channels present its certificate. The gateway's public port has its own `public_tls_*` settings.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from gateway.app import GatewayApp, start_gateway
from gateway.settings import GatewaySettings
from mesh.registry import Registry
from mesh.server import GRPC_OPTIONS
from mesh.store import ArtifactStore
from mesh_pb import common_pb2, registry_pb2, registry_pb2_grpc
from router.app import RouterApp, start_router
from router.settings import RouterSettings
from tests.reliability.harness import (
    DigitsArtifact,
    async_wait_until,
    make_digits_artifact,
    register_request,
    write_figures,
)
from workers.app import WorkerApp, start_worker
from workers.settings import WorkerSettings

ATTEMPTS = 20


@dataclass
class Pem:
    ca: Path
    cert: Path
    key: Path


def _issue(ca: trustme.CA, directory: Path, name: str) -> Pem:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    pem = Pem(directory / f"{name}-ca.pem", directory / f"{name}.pem", directory / f"{name}.key")
    ca.cert_pem.write_to_path(str(pem.ca))
    cert.cert_chain_pems[0].write_to_path(str(pem.cert))
    cert.private_key_pem.write_to_path(str(pem.key))
    return pem


@dataclass
class SecureMesh:
    mesh_pem: Pem  # the mesh's CA and the services' certificate
    public_pem: Pem  # the public port's CA and certificate
    rogue_pem: Pem  # a certificate from a CA nobody trusts
    worker: WorkerApp
    router: RouterApp
    gateway: GatewayApp
    digits: DigitsArtifact
    pixels: np.ndarray


@pytest.fixture
async def secure_mesh(
    redis_url: str, prefix: str, registry: Registry, store: ArtifactStore, tmp_path: Path
) -> AsyncIterator[SecureMesh]:
    mesh_pem = _issue(trustme.CA(), tmp_path, "mesh")
    public_pem = _issue(trustme.CA(), tmp_path, "public")
    rogue_pem = _issue(trustme.CA(), tmp_path, "rogue")
    tls = {"tls_cert_file": mesh_pem.cert, "tls_key_file": mesh_pem.key, "tls_ca_file": mesh_pem.ca}
    digits = make_digits_artifact(store, "digits", "v1")
    await registry.register_version(register_request("digits", digits.artifact))
    worker = await start_worker(
        WorkerSettings(
            bind="127.0.0.1:0", redis_url=redis_url, key_prefix=prefix, store_dir=store.root, device="cpu",
            heartbeat_interval_s=0.2, heartbeat_ttl_s=2.0, compute_threads=1, log_json=False, **tls,  # type: ignore[arg-type]
        )
    )  # fmt: skip
    router = gateway = None
    try:
        router = await start_router(
            RouterSettings(
                bind="127.0.0.1:0", redis_url=redis_url, key_prefix=prefix, poll_interval_s=0.1,
                publish_interval_s=0.5, placement_interval_s=0.2, log_json=False, **tls,  # type: ignore[arg-type]
            )
        )  # fmt: skip
        gateway = await start_gateway(
            GatewaySettings(
                bind="127.0.0.1:0", metrics_port=-1, redis_url=redis_url, key_prefix=prefix,
                router_address=router.address, auth_mode="optional",
                public_tls_cert_file=public_pem.cert, public_tls_key_file=public_pem.key, **tls,  # type: ignore[arg-type]
            )
        )  # fmt: skip
        pixels = np.random.default_rng(3).uniform(0, 16, (2, 64)).astype(np.float32)
        yield SecureMesh(mesh_pem, public_pem, rogue_pem, worker, router, gateway, digits, pixels)
    finally:
        if gateway is not None:
            await gateway.stop(0)
        if router is not None:
            await router.stop(0)
        await worker.stop(drain=False)


def _input(pixels: np.ndarray) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
    inp.set_data_from_numpy(pixels)
    return inp


async def _public_infer(m: SecureMesh, **client_kw: object) -> str:
    """Status of one ModelInfer through the gateway's public port with the given client settings."""
    client = grpcclient.InferenceServerClient(m.gateway.address, **client_kw)  # type: ignore[arg-type]
    try:
        result = await client.infer("digits", [_input(m.pixels)], client_timeout=5.0)
        np.testing.assert_allclose(
            result.as_numpy("logits"), m.digits.reference(m.pixels), rtol=1e-4, atol=1e-4
        )
        return "OK"
    except InferenceServerException as exc:
        return (exc.status() or "UNKNOWN").replace("StatusCode.", "")
    finally:
        await client.close()


def _channel(address: str, kind: str, m: SecureMesh) -> grpc.aio.Channel:
    """A channel to a mesh service: plaintext, TLS without a client cert, a rogue client cert, or the mesh's."""
    if kind == "plaintext":
        return grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
    ca = m.mesh_pem.ca.read_bytes()
    if kind == "tls_no_client_cert":
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
    elif kind == "rogue_client_cert":
        creds = grpc.ssl_channel_credentials(ca, m.rogue_pem.key.read_bytes(), m.rogue_pem.cert.read_bytes())
    else:
        creds = grpc.ssl_channel_credentials(ca, m.mesh_pem.key.read_bytes(), m.mesh_pem.cert.read_bytes())
    return grpc.aio.secure_channel(address, creds, options=GRPC_OPTIONS)


async def _health(address: str, kind: str, m: SecureMesh) -> str:
    channel = _channel(address, kind, m)
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5.0)
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    finally:
        await channel.close()


async def _router_admin(address: str, kind: str, m: SecureMesh) -> str:
    """The router's RegistryService (which can mint API keys) with the given client credentials."""
    channel = _channel(address, kind, m)
    try:
        await registry_pb2_grpc.RegistryServiceStub(channel).ListModels(
            registry_pb2.ListModelsRequest(), timeout=5.0
        )
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    finally:
        await channel.close()


@pytest.mark.slow
async def test_tls_public_port_and_mtls_between_services(
    secure_mesh: SecureMesh, registry: Registry, figures_path: Path
) -> None:
    m = secure_mesh

    async def version_ready() -> bool:
        return (await registry.get_version("digits", 1)).state == common_pb2.READY

    # The router loaded the version onto the worker over mTLS, and the gateway follows the router over mTLS.
    await async_wait_until(version_ready, 60.0, "digits:1 READY (router → worker over mTLS)")
    trusted = {"ssl": True, "root_certificates": str(m.public_pem.ca)}
    await async_wait_until(
        lambda: _status_is_ok(_public_infer(m, **trusted)),
        30.0,
        "inference through TLS gateway → mTLS worker",
    )

    results: dict[str, Counter[str]] = {}

    async def tally(case: str, coro_factory: object, n: int = ATTEMPTS) -> None:
        codes = await asyncio.gather(*(coro_factory() for _ in range(n)))  # type: ignore[operator]
        results[case] = Counter(codes)

    await tally("public_trusting_ca", lambda: _public_infer(m, **trusted))
    await tally("public_plaintext", lambda: _public_infer(m))
    await tally(
        "public_trusting_other_ca", lambda: _public_infer(m, ssl=True, root_certificates=str(m.rogue_pem.ca))
    )
    await tally(
        "public_trusting_mesh_ca", lambda: _public_infer(m, ssl=True, root_certificates=str(m.mesh_pem.ca))
    )
    for service, address in (("worker", m.worker.address), ("router", m.router.address)):
        for kind in ("plaintext", "tls_no_client_cert", "rogue_client_cert", "mesh_cert"):
            await tally(f"{service}_{kind}", lambda a=address, k=kind: _health(a, k, m))  # type: ignore[misc]
    for kind in ("plaintext", "tls_no_client_cert", "rogue_client_cert", "mesh_cert"):
        await tally(f"router_registry_admin_{kind}", lambda k=kind: _router_admin(m.router.address, k, m))  # type: ignore[misc]

    write_figures(
        figures_path,
        "transport_security",
        {"attempts_per_case": ATTEMPTS, "codes": {k: dict(v) for k, v in results.items()}},
    )
    assert results["public_trusting_ca"] == Counter(OK=ATTEMPTS)
    for case, counts in results.items():
        if case == "public_trusting_ca" or case.endswith("mesh_cert"):
            assert counts == Counter(OK=ATTEMPTS), (case, counts)
        else:
            assert counts["OK"] == 0 and counts["UNAVAILABLE"] == ATTEMPTS, (case, counts)


async def _status_is_ok(coro: object) -> bool:
    return await coro == "OK"  # type: ignore[misc]
